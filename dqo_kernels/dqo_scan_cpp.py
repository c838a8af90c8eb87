"""Launcher of the native CPU kernel of the fused DQO loss (``csrc/dqo_scan.cpp``); built and
loaded by :mod:`.native`."""
from __future__ import annotations

import ctypes
import math
from typing import Callable, Optional

import torch

from . import native
from .dqo_scan_reference import log_clip
from .dtypes import acc_dtype
from .validation import log_weight_limit, logprob_tolerance

# The smallest tolerance of validation.logprob_tolerance over the dtypes: the kernel flags any
# log-prob above it, a superset of what the exact check refuses for every dtype.
LOGPROB_TOLERANCE = min(logprob_tolerance(dt) for dt in
                        (torch.float32, torch.float64, torch.float16, torch.bfloat16))

__all__ = ["dqo_scan_cpp", "is_available"]

is_available = native.is_available


def _as(x, dtype):
    """``x`` as a contiguous ``dtype`` tensor: itself when it already is one (the kernel only
    reads its memory), so the common call dispatches no copy."""
    if x is None or (x.dtype == dtype and x.is_contiguous()):
        return x
    return x.detach().to(dtype).contiguous()


# loss_agg -> csrc/dqo_scan.cpp's LossAgg code
AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2}
_ptrs7 = ctypes.c_void_p * 7
_hyper = ctypes.c_double * 7
_flags = ctypes.c_int * 5


def dqo_scan_cpp(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, *,
                 loss_agg, num_tokens, beta, lam, gamma, is_clip, is_policy, is_value,
                 target_grad, data_checks: Optional[Callable[[], None]] = None):
    """Run the CPU kernel; float inputs are brought to one contiguous dtype: float64 if any of
    them is, else float32 (the compute dtype of the API and of the other backends). The kernel
    computes the row scale of ``loss_agg`` (``num_tokens``: a float, or None) itself.

    ``data_checks``: the Python data checks of the call, deferred. The kernel looks for what
    they refuse in its own passes, conservatively, and only a flagged batch runs them (they
    raise the exact error, or find the flag a false alarm). Returns (policy_loss, value_loss,
    returns, weights, td, dlogp, dvalues)."""
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    ref = _as(ref_logp, dtype)
    beh = ref if behavior_logp is None else _as(behavior_logp, dtype)
    logp, values, rewards, mask = (_as(logp, dtype), _as(values, dtype), _as(rewards, dtype),
                                   _as(mask, torch.bool))
    bootstrap = _as(bootstrap, dtype)
    B, T = logp.shape
    returns, weights, td, dlogp, dvalues = (torch.empty(B, T, dtype=dtype) for _ in range(5))
    policy, value = torch.empty((), dtype=dtype), torch.empty((), dtype=dtype)
    cap = log_clip(is_clip)
    limit = log_weight_limit(dtype)  # exp of more overflows the weights
    log_limit = limit if (is_policy or is_value) and cap > limit else math.inf
    status = native.call(
        "dqo_scan_forward", native.dtype_code(dtype),
        _ptrs7(logp.data_ptr(), ref.data_ptr(), beh.data_ptr(), values.data_ptr(),
               rewards.data_ptr(), mask.data_ptr(),
               None if bootstrap is None else bootstrap.data_ptr()),
        _ptrs7(returns.data_ptr(), weights.data_ptr(), td.data_ptr(), dlogp.data_ptr(),
               dvalues.data_ptr(), policy.data_ptr(), value.data_ptr()),
        B, T, _hyper(beta, gamma, lam, cap, LOGPROB_TOLERANCE, log_limit,
                     0.0 if num_tokens is None else float(num_tokens)),
        _flags(bool(is_policy), bool(is_value), bool(target_grad), data_checks is not None,
               AGG_CODES[loss_agg]),
        torch.get_num_threads(), native.MIN_WORK_PER_THREAD)
    if status == native.DATA_CHECK and data_checks is not None:
        data_checks()  # raises what is wrong; returns when the kernel's flag was conservative
    return policy, value, returns, weights, td, dlogp, dvalues

