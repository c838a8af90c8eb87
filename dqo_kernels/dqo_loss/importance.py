"""The truncated importance weights of the DQO loss (docs/math.md §3): their log-cap, their
untruncated logs ``c_t`` and the data check that they fit the compute dtype. Shared by the
definition (:mod:`.naive`), the native launcher, the metrics and the input checks."""
from __future__ import annotations

import math
from typing import List

import torch

from ..validation import Check, data_checks_enabled, log_weight_limit


def log_clip(is_clip: float) -> float:
    """``log C`` for the importance-ratio cap; ``inf`` means no truncation."""
    return math.inf if math.isinf(is_clip) else math.log(is_clip)


def cumulative_log_ratio(logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``c_t = sum over action positions j <= t of (logp_j - behavior_logp_j)`` ([B, T],
    detached, in ``dtype``): the untruncated log importance weight. Off the mask it carries the
    sum of the actions before it, and whatever the inputs hold there is never read."""
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    d = torch.where(mask, logp.detach().to(dtype) - behavior_logp.detach().to(dtype), zero)
    return torch.cumsum(d, dim=1)


def importance_weight_checks(logp: torch.Tensor, behavior: torch.Tensor, behavior_name: str,
                             mask: torch.Tensor, is_clip: float,
                             dtype: torch.dtype) -> List[Check]:
    """The truncated importance weights ``exp(min(c_t, log C))`` fit in ``dtype``.

    Only a cap beyond ``dtype``'s range (``is_clip=inf``, or e.g. 1e300 in fp32) needs the
    cumulative log-ratios ``c_t``; otherwise this costs nothing. Empty when the data checks are
    off: an overflowing weight then makes the loss inf or NaN.
    """
    limit = log_weight_limit(dtype)
    if not data_checks_enabled() or log_clip(is_clip) <= limit:
        return []
    c = cumulative_log_ratio(logp, behavior, mask, dtype)
    over = mask & (c > limit)

    def overflow():
        c_max = torch.where(mask, c, -math.inf)
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(c_max), c.shape))
        raise ValueError(
            f"is_clip: expected a cap that keeps the importance weights finite in {dtype} "
            f"(log C <= {limit:.2f}) for this batch, got is_clip={is_clip}: the largest "
            f"log-weight c_t = sum over actions j <= t of (logp_j - {behavior_name}_j) is "
            f"{c_max[idx].item():g} at index {idx}, and exp(c_t) overflows {dtype}. Truncate "
            f"the weights with a finite is_clip, or check {behavior_name}")
    return [(over.any(), overflow)]
