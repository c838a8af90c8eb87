"""Detached diagnostics of a DQO loss call (SPEC section 5), over action positions only.

All values are 0-dim tensors on the input device: logging them costs no synchronisation until
the caller reads them. Statistics of an empty batch are 0; the explained variance is NaN when
the returns have no variance (it is undefined there).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional

import torch


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
def dqo_metrics(returns: torch.Tensor, values: torch.Tensor, td_error: torch.Tensor,
                weights: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                is_clip: float) -> Dict[str, torch.Tensor]:
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
    if math.isinf(is_clip):
        clip_frac = zero
    else:
        clip_frac = mean((weights >= is_clip * (1.0 - 1e-6)).to(dtype))
    return {
        "return_mean": ret_mean,
        "value_mean": mean(values),
        "value_explained_var": explained,
        "td_abs_mean": mean(td_error.abs()),
        "td_abs_max": abs_delta.max() if abs_delta.numel() else zero,
        "kl": mean(log_ratio.detach()),
        "is_weight_mean": mean(weights),
        "is_weight_clip_frac": clip_frac,
        "is_ess": torch.where(w_sq > 0, w_sum.square() / (w_sq * n1), zero),
        "num_tokens": n,
    }
