"""DRO: the sequence-level special case of DQO (one action per response), policy + value
(docs/math.md §7).

Its value model is fit at the prompt alone, so a response cut at a length limit is scored as
what it is in that bandit form, a terminal action with its reward: bootstrapping from V of the
state after its last token would read the critic where it is never trained."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from dqo_kernels import dro_loss

from ..data import Batch
from ..losses import sequence_sum
from .base import (
    Algorithm,
    backward_and_step,
    non_finite,
    policy_logp,
    register,
    skip_with_nan_gradients,
)


@register("dro")
@dataclass
class DRO(Algorithm):
    beta: float = 0.1
    is_clip: float = 1.0
    needs_value = True
    needs_ref = True

    @classmethod
    def from_config(cls, cfg) -> "DRO":
        return cls(beta=cfg.beta, is_clip=cfg.is_clip)

    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        logp = policy_logp(engines, b)
        values = engines["value"](b.input_ids, b.attention_mask)
        if non_finite(logp, values, mask=b.action_mask):
            return skip_with_nan_gradients(engines, policy=logp, value=values)
        first = b.action_mask.float().argmax(-1)  # V(prompt) = V at the first action
        rows = torch.arange(len(first), device=first.device)
        beh = None if b.behavior_logp is None else sequence_sum(b.behavior_logp, b.action_mask)
        ret = sequence_sum(b.rewards, b.action_mask)  # the one action's reward, cut or not
        out = dro_loss(sequence_sum(logp, b.action_mask), sequence_sum(b.ref_logp, b.action_mask),
                       values[rows, first], ret,
                       behavior_logp=beh, beta=self.beta, is_clip=self.is_clip)
        backward_and_step(engines, {"policy": out.policy_loss, "value": out.value_loss})
        # the objective 0.5 (beta l + V - r)^2 is both losses (each reaches its own model):
        # out.loss, their sum, would log it twice
        return dict(loss=out.policy_loss.item(), policy_loss=out.policy_loss.item(),
                    value_loss=out.value_loss.item(), kl=out.metrics["kl"].item(),
                    num_tokens=float(len(first)))
