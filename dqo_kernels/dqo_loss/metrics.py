"""Detached diagnostics of a DQO loss call (docs/math.md §5), over action positions only.

All values are 0-dim tensors on the input device: logging them costs no synchronisation until
the caller reads them. Statistics of an empty batch are 0; the explained variance is NaN when
the returns have no variance (it is undefined there).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional

import torch

from .importance import cumulative_log_ratio, log_clip


class LazyMetrics(Mapping):
    """A read-only dict of metrics computed on first access (a loss call whose metrics are
    never read pays nothing for them)."""

    def __init__(self, compute: Callable[[], Dict[str, torch.Tensor]]):
        self._compute: Optional[Callable] = compute
        self._values: Optional[Dict[str, torch.Tensor]] = None

    def _get(self) -> Dict[str, torch.Tensor]:
        if self._values is None:
            self._values = self._compute()
            self._compute = None  # release the tensors it closed over
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return f"LazyMetrics({self._get()!r})"


@torch.no_grad()
def clipped_weights(logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                    is_clip: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] bool: the action positions whose importance weight the cap C truncated.

    A weight is clipped when its untruncated log ``c_t`` is above ``log C`` by more than
    rounding can explain::

        c_t - log C > 8 eps (sum over actions j <= t of (|logp_j| + |behavior_logp_j|) + |log C|)

    with ``eps`` that of the coarsest of the two inputs' dtypes and the compute dtype. The
    right-hand side bounds the rounding of the inputs, of their differences, of the cumulative
    sum and of ``log C``, so a weight that *equals* the cap (``pi_theta = pi_beta`` at
    ``C = 1``, the start of training) or exceeds it by a few ulps of its inputs is not clipped.
    """
    cap = log_clip(is_clip)
    if math.isinf(cap):
        return torch.zeros_like(mask)
    c = cumulative_log_ratio(logp, behavior_logp, mask, dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    magnitude = logp.detach().to(dtype).abs() + behavior_logp.detach().to(dtype).abs()
    size = torch.where(mask, magnitude, zero).cumsum(dim=1)
    eps = max(torch.finfo(t).eps for t in (logp.dtype, behavior_logp.dtype, dtype))
    return mask & (c - cap > 8 * eps * (size + abs(cap)))


@torch.no_grad()
def dqo_metrics(returns: torch.Tensor, values: torch.Tensor, td_error: torch.Tensor,
                weights: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                clipped: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``clipped``: :func:`clipped_weights`, counted by ``is_weight_clip_frac``."""
    dtype = returns.dtype
    m = mask.to(dtype)
    n = m.sum()
    n1 = n.clamp_min(1.0)
    zero = torch.zeros((), dtype=dtype, device=returns.device)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.to(dtype), zero).sum() / n1

    values = values.detach().to(dtype)
    ret_mean = mean(returns)
    ret_var = mean((returns - ret_mean).square())
    resid = returns - values
    resid_var = mean((resid - mean(resid)).square())
    explained = torch.where(ret_var > 0, 1.0 - resid_var / ret_var.clamp_min(1e-30),
                            torch.full_like(ret_var, math.nan))
    abs_delta = torch.where(mask, td_error.abs(), zero)
    w_sum = weights.sum()
    w_sq = weights.square().sum()
    return {
        "return_mean": ret_mean,
        "value_mean": mean(values),
        "value_explained_var": explained,
        "td_abs_mean": mean(td_error.abs()),
        "td_abs_max": abs_delta.max() if abs_delta.numel() else zero,
        # k3 (Schulman): exp(-l) - 1 + l >= 0 per token, an unbiased estimate of
        # KL(pi || ref) under samples of pi; the mean log-ratio alone goes negative on data the
        # policy did not sample, and is kept under its own name
        "kl": mean(torch.expm1(-log_ratio.detach()) + log_ratio.detach()),
        "log_ratio_mean": mean(log_ratio.detach()),
        "is_weight_mean": mean(weights),
        "is_weight_clip_frac": mean(clipped),
        "is_ess": torch.where(w_sq > 0, w_sum.square() / (w_sq * n1), zero),
        "num_tokens": n,
    }
