"""Launcher of the native CPU kernel of the fused DQO loss (``csrc/dqo_scan.cpp``); built and
loaded by :mod:`.native`."""
from __future__ import annotations

import ctypes

import torch

from . import native
from .dqo_scan_reference import log_clip
from .dtypes import acc_dtype

__all__ = ["dqo_scan_cpp", "is_available"]

is_available = native.is_available


def dqo_scan_cpp(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, row_scale, *,
                 beta, lam, gamma, is_clip, is_policy, is_value, target_grad):
    """Run the CPU kernel; float inputs are brought to one contiguous dtype: float64 if any of
    them is, else float32 (the compute dtype of the API and of the other backends).

    Returns (policy_rows, value_rows, returns, weights, td, dlogp, dvalues)."""
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    cast = lambda x: None if x is None else x.detach().to(dtype).contiguous()  # noqa: E731
    ref = cast(ref_logp)
    beh = ref if behavior_logp is None else cast(behavior_logp)
    inputs = [cast(logp), ref, beh, cast(values), cast(rewards),
              mask.to(torch.bool).contiguous(), cast(bootstrap), cast(row_scale)]
    B, T = inputs[0].shape
    outputs = [torch.empty(B, T, dtype=dtype) for _ in range(5)]
    outputs += [torch.empty(B, dtype=dtype) for _ in range(2)]
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(  # noqa: E731
        *(None if t is None else t.data_ptr() for t in ts))
    native.call("dqo_scan_forward", native.dtype_code(dtype), ptrs(inputs), ptrs(outputs), B, T,
                (ctypes.c_double * 4)(beta, gamma, lam, log_clip(is_clip)),
                (ctypes.c_int * 3)(bool(is_policy), bool(is_value), bool(target_grad)),
                torch.get_num_threads(), native.MIN_WORK_PER_THREAD)
    returns, weights, td, dlogp, dvalues, policy_rows, value_rows = outputs
    return policy_rows, value_rows, returns, weights, td, dlogp, dvalues
