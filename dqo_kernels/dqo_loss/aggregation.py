"""Loss aggregation as a per-row scale factor (docs/math.md §4).

Every aggregation the library supports is linear in the per-token losses, so it reduces to
one factor ``a_b`` per row: ``agg(x) = sum_b a_b * sum_{t in actions(b)} x_{b,t}``. Kernels take
``row_scale`` ([B]) and never need to know which aggregation produced it, and the closed-form
gradients of docs/math.md §3.7 pick up ``a_t = a_b`` for free. The launchers receive it as a
:class:`RowScale`, built when first asked for: the native kernel derives it from the mask itself.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def row_scale(
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
    num_tokens: Optional[Union[int, float, torch.Tensor]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row aggregation factor ``a_b`` ([B], ``dtype``) for a boolean action ``mask``.

    - ``token-mean``: ``1 / N`` with ``N = num_tokens`` if given (the global action-token count
      of a batch split into micro-batches), else the number of action tokens in ``mask``.
    - ``seq-mean-token-mean``: ``1 / (S * n_b)``: the mean over rows of each row's token mean.
    - ``seq-mean-token-sum``: ``1 / S``: the mean over rows of each row's token sum.

    ``S`` counts the rows that hold at least one action (an all-padding row is not a sequence),
    ``n_b`` the actions of row b. Empty batches give a zero loss, never a division by zero.
    Computed with tensor ops only, so it never synchronises a GPU.
    """
    n_b = mask.sum(dim=1, dtype=dtype)
    if loss_agg == "token-mean":
        if num_tokens is None:
            denom = n_b.sum()
        else:
            denom = torch.as_tensor(num_tokens, dtype=dtype, device=mask.device)
        return (1.0 / denom.clamp_min(1.0)).expand(mask.shape[0]).contiguous()
    if num_tokens is not None:
        raise ValueError(
            f"num_tokens: only applies to loss_agg='token-mean', got loss_agg={loss_agg!r}"
        )
    n_seq = (n_b > 0).sum(dtype=dtype).clamp_min(1.0)
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / (n_seq * n_b.clamp_min(1.0))
    if loss_agg == "seq-mean-token-sum":
        return (1.0 / n_seq).expand(mask.shape[0]).contiguous()
    raise ValueError(f"loss_agg: expected one of {LOSS_AGGS}, got {loss_agg!r}")


class RowScale:
    """The factors ``a_b`` of one call, as the launchers take them: either ``factors`` ([B],
    given), or the aggregation ``loss_agg`` of ``mask`` (with ``num_tokens``), computed by
    :func:`row_scale` when first asked for in a dtype (:meth:`tensor`). A backend that computes
    them from the mask itself (the native kernel) reads ``loss_agg`` and ``num_tokens`` when
    ``factors`` is None, and never builds the tensor."""

    def __init__(self, mask: torch.Tensor, loss_agg: str = "token-mean",
                 num_tokens: Optional[float] = None, factors: Optional[torch.Tensor] = None):
        self.mask, self.loss_agg, self.num_tokens, self.factors = (mask, loss_agg, num_tokens,
                                                                   factors)
        self._tensors: Dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def given(cls, factors: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "RowScale":
        """Explicit factors ``a_b`` ([B])."""
        return cls(mask, factors=factors)

    def tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """``a_b`` as a contiguous ``[B]`` tensor of ``dtype`` (built once per dtype)."""
        out = self._tensors.get(dtype)
        if out is None:
            if self.factors is not None:
                out = self.factors.detach().to(dtype).contiguous()
            else:
                out = row_scale(self.mask, self.loss_agg, self.num_tokens, dtype=dtype)
            self._tensors[dtype] = out
        return out

    @property
    def inputs(self) -> Tuple[torch.Tensor, ...]:
        """The tensors the factors are read from (a recompute checks them unchanged)."""
        return (self.factors,) if self.factors is not None else ()
