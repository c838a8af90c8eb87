"""Plain PyTorch definitions of the log-prob ops: materialise the logits, ``log_softmax``,
gather. The tests' oracle (pass float64 inputs for a high-precision one)."""
from __future__ import annotations

from typing import Optional

import torch

from ..dtypes import acc_dtype


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, ignore_index: int = -100,
                             return_entropy: bool = False):
    """``log softmax(logits / temperature)[target]`` per token; 0 where target == ignore_index.
    Logits ``[..., V]``, targets ``[...]``; result in fp32 (fp64 for fp64 logits)."""
    acc = acc_dtype(logits)
    logp_all = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    ignore = targets == ignore_index
    y = torch.where(ignore, 0, targets).long()
    logp = logp_all.gather(-1, y[..., None])[..., 0]
    logp = torch.where(ignore, 0.0, logp)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # Banned tokens (logit -inf) add 0; zeroing their log-prob first keeps autograd off 0 * -inf.
    ent = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, torch.where(ignore, 0.0, ent)


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor,
                              targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                              temperature: float = 1.0, ignore_index: int = -100):
    """``token_logprobs_reference(hidden @ weight.T + bias, targets)``, logits in fp32 (fp64)."""
    acc = acc_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T
    if bias is not None:
        logits = logits + bias.to(acc)
    return token_logprobs_reference(logits, targets, temperature=temperature,
                                    ignore_index=ignore_index)
