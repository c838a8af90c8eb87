"""Loss functions of the trainer: pure functions of per-token tensors (``[B, T]``, aligned on
the action position). The DQO loss itself is :func:`dqo_kernels.fused_dqo_loss`."""
from __future__ import annotations

import torch


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per action token, averaged over the batch's action tokens."""
    m = mask.to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp_min(1.0)
