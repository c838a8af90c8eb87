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

# The smallest tolerance of validation.logprob_tolerance (fp32's): the kernel flags any
# log-prob above it, a superset of what the exact check refuses for every dtype.
LOGPROB_TOLERANCE = 1e-3

__all__ = ["dqo_scan_cpp", "is_available"]

is_available = native.is_available


def _as(x, dtype):
    """``x`` as a contiguous ``dtype`` tensor: itself when it already is one (the kernel only
    reads its memory), so the common call dispatches no copy."""
    if x is None or (x.dtype == dtype and x.is_contiguous()):
        return x
    return x.detach().to(dtype).contiguous()


def dqo_scan_cpp(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, row_scale, *,
                 beta, lam, gamma, is_clip, is_policy, is_value, target_grad,
                 data_checks: Optional[Callable[[], None]] = None):
    """Run the CPU kernel; float inputs are brought to one contiguous dtype: float64 if any of
    them is, else float32 (the compute dtype of the API and of the other backends).

    ``data_checks``: the Python data checks of the call, deferred. The kernel looks for what
    they refuse in its own passes, conservatively, and only a flagged batch runs them (they
    raise the exact error, or find the flag a false alarm). Returns (policy_rows, value_rows,
    returns, weights, td, dlogp, dvalues)."""
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    ref = _as(ref_logp, dtype)
    beh = ref if behavior_logp is None else _as(behavior_logp, dtype)
    inputs = [_as(logp, dtype), ref, beh, _as(values, dtype), _as(rewards, dtype),
              _as(mask, torch.bool), _as(bootstrap, dtype), _as(row_scale, dtype)]
    B, T = inputs[0].shape
    outputs = [torch.empty(B, T, dtype=dtype) for _ in range(5)]
    outputs += [torch.empty(B, dtype=dtype) for _ in range(2)]
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(  # noqa: E731
        *(None if t is None else t.data_ptr() for t in ts))
    cap = log_clip(is_clip)
    limit = math.log(torch.finfo(dtype).max)  # exp of more overflows the weights
    log_limit = limit if (is_policy or is_value) and cap > limit else math.inf
    status = native.call(
        "dqo_scan_forward", native.dtype_code(dtype), ptrs(inputs), ptrs(outputs), B, T,
        (ctypes.c_double * 6)(beta, gamma, lam, cap, LOGPROB_TOLERANCE, log_limit),
        (ctypes.c_int * 4)(bool(is_policy), bool(is_value), bool(target_grad),
                           data_checks is not None),
        torch.get_num_threads(), native.MIN_WORK_PER_THREAD)
    if status == native.DATA_CHECK and data_checks is not None:
        data_checks()  # raises what is wrong; returns when the kernel's flag was conservative
    returns, weights, td, dlogp, dvalues, policy_rows, value_rows = outputs
    return policy_rows, value_rows, returns, weights, td, dlogp, dvalues
