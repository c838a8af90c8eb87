"""DPO on pairs of a correct and an incorrect sample of a prompt (at most 12 a prompt)."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence

from ..data import Batch, Example, collate
from ..losses import dpo_loss, sequence_sum
from ..prompts import prompt_key
from .base import Algorithm, backward_and_step, policy_logp, register


def collate_pairs(chunk: Sequence, pad_id: int, padding: str) -> Batch:
    """Pairs as one batch: every pair's first, then every pair's second."""
    return collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id, padding=padding)


@register("dpo")
@dataclass
class DPO(Algorithm):
    beta: float = 0.1
    max_pairs: int = 12
    needs_ref = True

    @classmethod
    def from_config(cls, cfg) -> "DPO":
        return cls(beta=cfg.beta)

    def items(self, examples: List[Example], seed: int = 0) -> List:
        by_prompt: Dict[str, List[Example]] = defaultdict(list)
        for e in examples:
            by_prompt[prompt_key(e.prompt)].append(e)  # a conversation is a list
        rng = random.Random(seed)
        pairs = []
        for group in by_prompt.values():
            good = [e for e in group if e.correct]
            bad = [e for e in group if not e.correct]
            all_pairs = [(g, b) for g in good for b in bad]
            pairs += rng.sample(all_pairs, min(self.max_pairs, len(all_pairs)))
        return pairs

    def collate(self, chunk: Sequence, pad_id: int, padding: str = "right") -> Batch:
        return collate_pairs(chunk, pad_id, padding)  # chosen rows, then rejected

    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        seq = sequence_sum(policy_logp(engines, b), b.action_mask)
        ref = sequence_sum(b.ref_logp, b.action_mask)
        P = seq.shape[0] // 2
        loss = dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=self.beta)
        backward_and_step(engines, {"policy": loss})
        margin = ((seq[:P] - ref[:P]) - (seq[P:] - ref[P:])).mean().item()
        return dict(loss=loss.item(), margin=margin, num_tokens=float(P))
