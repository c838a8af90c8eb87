"""DQO: token-level soft Q-learning with lambda-returns and importance sampling
(docs/math.md §3): ``fused_dqo_loss`` on the policy's log-probs and the value model's values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from dqo_kernels import fused_dqo_loss

from ..configs import DQOLossConfig
from ..data import Batch
from .base import (
    Algorithm,
    backward_and_step,
    non_finite,
    policy_logp,
    register,
    skip_with_nan_gradients,
    values_and_bootstrap,
)


@register("dqo")
@dataclass
class DQO(Algorithm):
    loss: DQOLossConfig = field(default_factory=DQOLossConfig)
    needs_value = True
    needs_ref = True

    @classmethod
    def from_config(cls, cfg) -> "DQO":
        return cls(cfg.section(DQOLossConfig))

    def step(self, engines, b: Batch, num_tokens) -> Dict[str, float]:
        logp = policy_logp(engines, b)
        values, bootstrap = values_and_bootstrap(engines, b)
        if non_finite(logp, values, mask=b.action_mask) or non_finite(bootstrap):
            return skip_with_nan_gradients(engines, policy=logp, value=values)
        out = fused_dqo_loss(
            logp, b.ref_logp, values, b.rewards, b.action_mask, behavior_logp=b.behavior_logp,
            bootstrap=bootstrap, **self.loss.loss_kwargs(),
            num_tokens=num_tokens if self.loss.loss_agg == "token-mean" else None)
        backward_and_step(engines, {"policy": out.policy_loss, "value": out.value_loss})
        stats = {k: v.item() for k, v in out.metrics.items()}
        stats.update(policy_loss=out.policy_loss.item(), value_loss=out.value_loss.item())
        stats["loss"] = stats["policy_loss"] + stats["value_loss"]
        return stats
