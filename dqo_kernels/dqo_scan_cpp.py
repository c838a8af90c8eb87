"""Launcher of the native CPU kernel of the fused DQO loss (``csrc/dqo_scan.cpp``); built and
loaded by :mod:`.native`."""
from __future__ import annotations

from .dqo_scan_reference import log_clip
from .dtypes import acc_dtype
from .native import is_available, load_extension

__all__ = ["dqo_scan_cpp", "is_available"]


def dqo_scan_cpp(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, row_scale, *,
                 beta, lam, gamma, is_clip, is_policy, is_value, target_grad):
    """Run the CPU kernel; float inputs are brought to one dtype: float64 if any of them is,
    else float32 (the compute dtype of the API and of the other backends)."""
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    cast = lambda x: None if x is None else x.detach().to(dtype)  # noqa: E731
    ref = cast(ref_logp)
    beh = ref if behavior_logp is None else cast(behavior_logp)
    return tuple(load_extension().dqo_scan_forward(
        cast(logp), ref, beh, cast(values), cast(rewards), mask, cast(bootstrap),
        row_scale, float(beta), float(gamma), float(lam), log_clip(is_clip),
        bool(is_policy), bool(is_value), bool(target_grad),
    ))
