"""SFT (the examples' responses as targets: give reference solutions) and RS (rejection
sampling: SFT on the correct samples)."""
from __future__ import annotations

from typing import Dict, List

from ..data import Batch, Example
from ..losses import sft_loss
from .base import Algorithm, backward_and_step, policy_logp, register


@register("sft")
class SFT(Algorithm):
    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        loss = sft_loss(policy_logp(engines, b), b.action_mask)
        backward_and_step(engines, {"policy": loss})
        return dict(loss=loss.item(), num_tokens=float(b.action_mask.sum()))


@register("rs")
class RS(SFT):
    def items(self, examples: List[Example], seed: int = 0) -> List:
        return [e for e in examples if e.correct]
