"""Launcher of the native CPU kernel of the fused DQO loss (``csrc/dqo_loss.cpp``); built and
loaded by :mod:`dqo_kernels._native`."""
from __future__ import annotations

import ctypes
import math
from typing import Callable, Optional

import torch

from .._native import load as native
from ..dtypes import acc_dtype
from ..validation import MIN_LOGPROB_TOLERANCE, log_weight_limit
from .aggregation import RowScale
from .importance import log_clip
from .launch import DQOHyper, LaunchOutput

# The kernel flags any log-prob above this, a superset of what the exact check refuses.
LOGPROB_TOLERANCE = MIN_LOGPROB_TOLERANCE

__all__ = ["dqo_loss_forward", "is_available"]

is_available = native.is_available


def _as(x, dtype):
    """``x`` as a contiguous ``dtype`` tensor: itself when it already is one (the kernel only
    reads its memory), so the common call dispatches no copy."""
    if x is None or (x.dtype == dtype and x.is_contiguous()):
        return x
    return x.detach().to(dtype).contiguous()


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def dqo_loss_forward(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                     row_scale: RowScale, hyper: DQOHyper,
                     data_checks: Optional[Callable[[], None]] = None) -> LaunchOutput:
    """Run the CPU kernel (the launcher signature of :mod:`.launch`); float inputs are brought
    to one contiguous dtype: float64 if any of them is, else float32 (the compute dtype of the
    API and of the other backends).

    Fast paths behind the signature: without given factors, the kernel computes the row scale
    of ``row_scale.loss_agg`` from the mask itself, and it sums the rows' losses (in row order,
    in double), so that a call needs no tensor op around it.

    ``data_checks``: the Python data checks of the call, deferred. The kernel looks for what
    they refuse in its own passes, conservatively, and only a flagged batch runs them (they
    raise the exact error, or find the flag a false alarm)."""
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    ref = _as(ref_logp, dtype)
    beh = ref if behavior_logp is None else _as(behavior_logp, dtype)
    logp, values, rewards, mask = (_as(logp, dtype), _as(values, dtype), _as(rewards, dtype),
                                   _as(mask, torch.bool))
    bootstrap = _as(bootstrap, dtype)
    factors = None if row_scale.factors is None else row_scale.tensor(dtype)
    B, T = logp.shape
    returns, weights, td, dlogp, dvalues = (torch.empty(B, T, dtype=dtype) for _ in range(5))
    policy_rows, value_rows = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    policy, value = torch.empty((), dtype=dtype), torch.empty((), dtype=dtype)
    cap = log_clip(hyper.is_clip)
    limit = log_weight_limit(dtype)  # exp of more overflows the weights
    checking = hyper.is_policy or hyper.is_value
    num_tokens = row_scale.num_tokens
    tensors = native.DqoLossTensors(
        logp=logp.data_ptr(), ref_logp=ref.data_ptr(), behavior_logp=beh.data_ptr(),
        values=values.data_ptr(), rewards=rewards.data_ptr(), mask=mask.data_ptr(),
        bootstrap=_ptr(bootstrap), row_scale=_ptr(factors),
        returns=returns.data_ptr(), weights=weights.data_ptr(), td_error=td.data_ptr(),
        dlogp=dlogp.data_ptr(), dvalues=dvalues.data_ptr(), policy_rows=policy_rows.data_ptr(),
        value_rows=value_rows.data_ptr(), policy_loss=policy.data_ptr(),
        value_loss=value.data_ptr())
    hyper_c = native.DqoHyper(
        beta=hyper.beta, lam=hyper.lam, gamma=hyper.gamma, log_clip=cap,
        logprob_tol=LOGPROB_TOLERANCE,
        log_limit=limit if checking and cap > limit else math.inf,
        num_tokens=0.0 if num_tokens is None else float(num_tokens),
        is_policy=bool(hyper.is_policy), is_value=bool(hyper.is_value),
        target_grad=bool(hyper.target_grad), check=data_checks is not None,
        loss_agg=native.LOSS_AGG_CODES[row_scale.loss_agg] if factors is None else 0)
    status = native.call("dqo_loss_forward", native.dtype_code(dtype), ctypes.byref(tensors),
                         ctypes.byref(hyper_c), B, T, torch.get_num_threads(),
                         native.MIN_WORK_PER_THREAD)
    if status == native.DATA_CHECK and data_checks is not None:
        data_checks()  # raises what is wrong; returns when the kernel's flag was conservative
    return LaunchOutput(policy_rows, value_rows, returns, weights, td, dlogp, dvalues,
                        policy_loss=policy, value_loss=value)
