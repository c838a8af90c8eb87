"""Loss aggregation as a per-row scale factor (SPEC section 4).

Every aggregation the library supports is linear in the per-token losses, so it reduces to
one factor ``a_b`` per row: ``agg(x) = sum_b a_b * sum_{t in actions(b)} x_{b,t}``. Kernels take
``row_scale`` ([B]) and never need to know which aggregation produced it, and the closed-form
gradients of SPEC 3.7 pick up ``a_t = a_b`` for free.
"""
from __future__ import annotations

from typing import Optional, Union

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
