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


def kto_reference_point(kl_logp: torch.Tensor, kl_ref: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0, as TRL's KTOTrainer estimates it: the mean log-ratio of
    MISMATCHED (prompt, completion) pairs, averaged over all ranks, clamped at 0, detached."""
    z = (kl_logp - kl_ref).detach().float().mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(z)
        z = z / torch.distributed.get_world_size()
    return z.clamp_min(0.0)


def kto_loss(logp: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor,
             beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al., 2024) as TRL's KTOTrainer, on sequence log-probs ([B]) with
    binary labels (the outcome's correctness). ``r = logp - ref``, ``z0`` from
    :func:`kto_reference_point`::

        desirable:   lambda_d * (1 - sigmoid(beta * (r - z0)))
        undesirable: lambda_u * (1 - sigmoid(beta * (z0 - r)))

    averaged over the batch."""
    r = logp - ref
    loss = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (r - z0))),
                       lambda_u * (1 - torch.sigmoid(beta * (z0 - r))))
    return loss.mean()


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple:
    """``(lambda_d, lambda_u)`` by the KTO paper's rule: lambda_u = 1 and lambda_d the value
    nearest 1 with ``lambda_d * n_D / (lambda_u * n_U)`` in [1, 4/3]."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    return min(max(1.0, 1.0 / ratio), 4.0 / 3.0 / ratio), 1.0
