"""The data checks of one :func:`dqo_kernels.fused_dqo_loss` call (finite values, log-probs
<= 0, no reward off the mask, importance weights that fit the compute dtype)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..dtypes import acc_dtype
from ..validation import Check, run_checks, value_checks
from .importance import importance_weight_checks


def loss_checks(logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                rewards: torch.Tensor, mask: torch.Tensor, behavior_logp: Optional[torch.Tensor],
                bootstrap: Optional[torch.Tensor], is_clip: float, is_policy: bool,
                is_value: bool) -> list[Check]:
    """The call's checks, as (flag, report) pairs (:data:`dqo_kernels.validation.Check`)."""
    behavior, behavior_name = ((ref_logp, "ref_logp") if behavior_logp is None
                               else (behavior_logp, "behavior_logp"))
    checks = value_checks({"logp": logp, "ref_logp": ref_logp, "values": values,
                           "rewards": rewards, "behavior_logp": behavior_logp,
                           "bootstrap": bootstrap}, mask, rewards=rewards,
                          whole=("rewards", "bootstrap"),
                          log_probs=("logp", "ref_logp", "behavior_logp"))
    if is_policy or is_value:  # otherwise the weights are only reported, never used
        dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
        checks += importance_weight_checks(logp, behavior, behavior_name, mask, is_clip, dtype)
    return checks


def data_checks(*args, **kwargs) -> Callable[[], None]:
    """A function that runs :func:`loss_checks` and raises the first failure."""
    return lambda: run_checks(loss_checks(*args, **kwargs))
