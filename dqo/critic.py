"""What makes the value model (the critic) learn from its first step: its head's starting
value, and a warning when it does not learn (docs/trainer.md, "The critic").

A value head initialised at 0 reads the first returns against 0: with outcome rewards in
[0, 1] and a policy lr-sized value lr it is still near 0 after a whole run, and every TD error
and advantage it gives is the return itself. Starting it at the data's mean return makes V a
baseline from step 1; the learning rate of its own (``--value-lr-ratio``) lets it fit the rest.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from typing import Dict, Optional, Sequence

import torch

log = logging.getLogger("dqo.train")

# Explained variance of the value model below this after the watch's step: it has not learned.
LOW_EXPLAINED_VARIANCE = 0.05


def mean_return(examples: Sequence, gamma: float = 1.0) -> float:
    """The mean over ``examples`` of the discounted return from the first response token,
    ``sum_t gamma^t r_t`` over the response's per-token rewards (outcome and process
    rewards; a cut response's return counts its rewards alone, its bootstrap is V's own)."""
    if not examples:
        raise ValueError("mean_return: no examples")
    total = 0.0
    for e in examples:
        total += sum(r * gamma ** t for t, r in enumerate(e.rewards))
    return total / len(examples)


def init_value_head(value, initial: float) -> None:
    """Set the scalar head of ``value`` (:class:`~dqo.modeling.ValueModel` or
    :class:`~dqo.modeling.SharedValueModel`) to predict ``initial`` everywhere: zero weight,
    bias ``initial``."""
    with torch.no_grad():
        value.head.weight.zero_()
        value.head.bias.fill_(float(initial))


class ExplainedVarianceWatch:
    """Logs one warning when the value model's explained variance, averaged over the last
    ``window`` steps, is still below :data:`LOW_EXPLAINED_VARIANCE` at step ``after``
    (default: 50, or a quarter of a shorter run): a critic that explains none of the returns
    gives no baseline. It decides once, at the first row from step ``after`` on."""

    def __init__(self, total_steps: int, after: Optional[int] = None, window: int = 10):
        self.after = after if after is not None else max(1, min(50, total_steps // 4))
        self.recent = deque(maxlen=window)
        self.done = False

    def __call__(self, row: Dict) -> bool:
        """Look at one metrics row; True when it logged the warning."""
        ev = row.get("value_explained_var")
        if self.done or ev is None:
            return False
        if math.isfinite(ev):
            self.recent.append(ev)
        if row["step"] < self.after or not self.recent:
            return False
        self.done = True
        mean = sum(self.recent) / len(self.recent)
        if mean >= LOW_EXPLAINED_VARIANCE:
            return False
        log.warning("step %d: the value model explains %.3f of the returns' variance (mean of "
                    "the last %d steps; below %.2f): the critic is not learning, so V gives no "
                    "baseline. Raise its learning rate (--value-lr-ratio, --value-lr), or check "
                    "the rewards", row["step"], mean, len(self.recent), LOW_EXPLAINED_VARIANCE)
        return True
