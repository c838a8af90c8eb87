"""The DQO metrics a ``DQOTrainer`` logs, averaged over each logging interval (TRL's
``_stored_metrics`` pattern): every loss call adds one value per metric, ``log`` reports their
mean (NaN values, such as the explained variance of constant returns, left out) and clears."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List

import torch

# the loss's own diagnostics (dqo_kernels/dqo_loss/metrics.py) that are logged, under their names
LOSS_METRICS = ("is_ess", "is_weight_clip_frac", "is_weight_mean", "value_explained_var",
                "return_mean", "value_mean", "td_abs_mean")


@torch.no_grad()
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) per action token, Schulman's k3 estimator ``exp(-l) - 1 + l`` with ``l``
    the log-ratio policy / reference: never negative, unbiased on the policy's own samples
    (the mean log-ratio the loss reports is unbiased too but can be negative)."""
    lr = (logp.float() - ref_logp.float())[mask]
    if lr.numel() == 0:
        return torch.zeros((), device=logp.device)
    return (torch.expm1(-lr) + lr).mean()


def step_metrics(out, logp, ref_logp, mask) -> Dict[str, torch.Tensor]:
    """One loss call's metrics: policy and value loss, the KL estimate, the mean log-ratio and
    :data:`LOSS_METRICS` (detached 0-dim tensors)."""
    m = out.metrics
    return {"policy_loss": out.policy_loss.detach(), "value_loss": out.value_loss.detach(),
            "kl": kl_estimate(logp, ref_logp, mask), "log_ratio_mean": m["kl"],
            **{k: m[k] for k in LOSS_METRICS}}


class MetricStore:
    """Metrics of the calls since the last log, per mode (``train``, ``eval``)."""

    def __init__(self):
        self._values: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, mode: str, metrics: Dict[str, torch.Tensor], gather=None) -> None:
        """Append one call's metrics; ``gather`` (e.g. ``accelerator.gather``) averages them
        over the processes first. One host synchronisation per call."""
        names = list(metrics)
        values = torch.stack([metrics[k].float().reshape(()) for k in names])
        if gather is not None:
            values = gather(values[None]).reshape(-1, len(names)).nanmean(0)
        for k, v in zip(names, values.tolist()):
            self._values[mode][k].append(v)

    def pop(self, mode: str) -> Dict[str, float]:
        """The mean of each metric since the last pop (NaN left out; NaN if only NaN)."""
        out = {}
        for k, vs in self._values.pop(mode, {}).items():
            finite = [v for v in vs if not math.isnan(v)]
            out[k] = sum(finite) / len(finite) if finite else math.nan
        return out
