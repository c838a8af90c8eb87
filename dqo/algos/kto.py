"""KTO on every sample, label = correctness (the outcome reward, never process rewards), as
TRL's KTOTrainer: its reference point from mismatched (prompt, completion) pairs, the
desirable weight by the KTO paper's ratio rule."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..data import Batch, Example
from ..losses import kto_loss, kto_reference_point, kto_weights, sequence_sum
from ..prompts import prompt_key
from ..reference_logps import compute_ref_logps
from .base import Algorithm, backward_and_step, policy_logp, register
from .dpo import collate_pairs

log = logging.getLogger(__name__)


def mismatched(examples: Sequence[Example]) -> List[Example]:
    """For KTO's reference point: example i's prompt with another prompt's response. Examples
    are grouped by prompt and every response moves on by the largest group's size, so that it
    always lands on a different prompt (when there is more than one)."""
    order = sorted(range(len(examples)), key=lambda i: prompt_key(examples[i].prompt))
    groups: Dict[str, int] = defaultdict(int)
    for e in examples:  # prompt_key: a conversation is a list
        groups[prompt_key(e.prompt)] += 1
    shift = max(groups.values()) if len(groups) > 1 else 1
    out: List[Optional[Example]] = [None] * len(examples)
    for k, i in enumerate(order):
        j = order[(k + shift) % len(order)]
        e, other = examples[i], examples[j]
        out[i] = Example(e.prompt_ids, other.response_ids, [0.0] * len(other.response_ids),
                         prompt=e.prompt, response=other.response,
                         source=f"{e.source} x {other.source}", finished=other.finished)
    same = sum(a.prompt == b.prompt for a, b in zip(examples, out))
    if same:  # one prompt holds more than half of the samples: not every pair can mismatch
        log.warning("KTO: %d of %d reference-point pairs share their prompt (one prompt has "
                    "more than half of the samples)", same, len(out))
    return out


@register("kto")
@dataclass
class KTO(Algorithm):
    beta: float = 0.1
    desirable_weight: Optional[float] = None  # None: the KTO paper's ratio rule
    undesirable_weight: Optional[float] = None  # None: 1
    needs_ref = True

    @classmethod
    def from_config(cls, cfg) -> "KTO":
        return cls(beta=cfg.beta, desirable_weight=cfg.kto_desirable_weight,
                   undesirable_weight=cfg.kto_undesirable_weight)

    def items(self, examples: List[Example], seed: int = 0) -> List:
        return list(zip(examples, mismatched(examples)))  # (example, its mismatched pair)

    def collate(self, chunk: Sequence, pad_id: int, padding: str = "right") -> Batch:
        return collate_pairs(chunk, pad_id, padding)  # rows, then their KL pairs

    def setup(self, items: List, policy, pad_id: int, cache_dir: str) -> None:
        """Reference log-probs of the mismatched pairs (``policy`` is still the reference),
        and the sample weights (the KTO paper's rule unless given)."""
        compute_ref_logps(policy, [kl for _, kl in items], pad_id, cache_dir=cache_dir)
        n_d = sum(e.correct for e, _ in items)
        rule_d, rule_u = kto_weights(n_d, len(items) - n_d)
        if self.desirable_weight is None:
            self.desirable_weight = rule_d
        if self.undesirable_weight is None:
            self.undesirable_weight = rule_u
        log.info("KTO: %d desirable, %d undesirable samples; weights %.3f / %.3f", n_d,
                 len(items) - n_d, self.desirable_weight, self.undesirable_weight)

    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        B = b.input_ids.shape[0] // 2
        rows, pairs = b.select(slice(0, B)), b.select(slice(B, None))
        m = rows.action_mask
        seq, ref = sequence_sum(policy_logp(engines, rows), m), sequence_sum(rows.ref_logp, m)
        with torch.no_grad():  # the reference point carries no gradient (TRL)
            kl = sequence_sum(policy_logp(engines, pairs), pairs.action_mask)
        z0 = kto_reference_point(kl, sequence_sum(pairs.ref_logp, pairs.action_mask))
        # the outcome label, not the summed reward: process rewards never make a failed
        # response desirable
        loss = kto_loss(seq, ref, rows.correct, z0, beta=self.beta,
                        lambda_d=self.desirable_weight, lambda_u=self.undesirable_weight)
        backward_and_step(engines, {"policy": loss})
        return dict(loss=loss.item(), kl=z0.item(), num_tokens=float(B))
