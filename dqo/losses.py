"""Loss functions of the trainer: pure functions of per-token tensors (``[B, T]``, aligned on
the action position). The DQO loss itself is :func:`dqo_kernels.fused_dqo_loss`."""
from __future__ import annotations

import torch


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per action token, averaged over the batch's action tokens."""
    m = mask.to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp_min(1.0)


def sequence_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over action tokens ([B, T] -> [B])."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_ref: torch.Tensor,
             rejected_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al., 2023) on sequence log-probs ([P] each):
    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over pairs."""
    margin = (chosen_logp - chosen_ref) - (rejected_logp - rejected_ref)
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def kto_loss(logp: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float = 0.1,
             lambda_d: float = 1.0, lambda_u: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al., 2024) on sequence log-probs ([B]) with binary labels.

    ``r = logp - ref``; the reference point ``z`` is the batch's KL estimate, detached and
    clamped at 0 (the common simplification of the paper's mismatched-pair estimate)::

        desirable:   lambda_d * (1 - sigmoid(beta * (r - z)))
        undesirable: lambda_u * (1 - sigmoid(beta * (z - r)))
    """
    r = logp - ref
    z = r.detach().mean().clamp_min(0.0)
    loss = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (r - z))),
                       lambda_u * (1 - torch.sigmoid(beta * (z - r))))
    return loss.mean()
