"""The two log-prob launchers of :mod:`.triton` as native CPU kernels (``csrc/logprobs.cpp``),
with the same signatures and the same math; built and loaded by :mod:`dqo_kernels._native`.
Rows run in parallel, each in vectorised passes over its vocabulary slice. Large buffers come
from :mod:`.cpu_pool` (``empty``)."""
from __future__ import annotations

import torch

from .._native import load as native
from ..dtypes import acc_dtype
from .cpu_pool import empty

__all__ = ["empty", "logits_grad", "lse_forward"]


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu" or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a CPU [N, V] tensor with unit column stride, got "
                         f"shape {tuple(t.shape)}, strides {t.stride()} on {t.device}")


def _check_rows_of(n: int, **vectors) -> None:
    """Every per-row vector holds N entries: the kernel reads N of each, unchecked."""
    for name, v in vectors.items():
        if v is not None and v.numel() != n:
            raise ValueError(f"{name}: expected {n} entries (one per row of logits), got shape "
                             f"{tuple(v.shape)}")


def lse_forward(logits: torch.Tensor, targets: torch.Tensor, v0: int, inv_temp: float,
                want_ez: bool, ignore_index: int = -100):
    """(lse, zt, ez or None), each [N] in the compute dtype (see csrc/logprobs.cpp); every row
    is computed, ``ignore_index`` is not read (the callers zero the ignored rows)."""
    _check_rows(logits, "logits")
    N, V = logits.shape
    _check_rows_of(N, targets=targets)
    acc = acc_dtype(logits)
    targets = targets.to(torch.int64).contiguous()
    lse, zt = torch.empty(N, dtype=acc), torch.empty(N, dtype=acc)
    ez = torch.empty(N, dtype=acc) if want_ez else None
    native.call("dqo_lse_forward", native.dtype_code(logits.dtype), logits.data_ptr(),
                logits.stride(0), targets.data_ptr(), N, V, int(v0), float(inv_temp),
                lse.data_ptr(), zt.data_ptr(), _ptr(ez), torch.get_num_threads(),
                native.LOGPROB_MIN_WORK_PER_THREAD)
    return lse, zt, ez


def logits_grad(logits, targets, lse, grad, v0: int, inv_temp: float, out, grad_ent=None,
                entropy=None, ignore_index: int = -100):
    """``out`` may be ``logits`` (in-place backward), or any [N, V] buffer of the logits' dtype
    or of the compute dtype."""
    _check_rows(logits, "logits")
    _check_rows(out, "out")
    N, V = logits.shape
    if out.shape != logits.shape:
        raise ValueError(f"out: expected shape {tuple(logits.shape)}, got {tuple(out.shape)}")
    acc = acc_dtype(logits)
    if out.dtype not in (logits.dtype, acc):
        raise ValueError(f"out: expected dtype {logits.dtype} or {acc}, got {out.dtype}")
    if (grad_ent is None) != (entropy is None):
        raise ValueError("grad_ent and entropy: expected both or neither")
    _check_rows_of(N, targets=targets, lse=lse, grad=grad, grad_ent=grad_ent, entropy=entropy)
    vec = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    targets = targets.to(torch.int64).contiguous()
    lse, grad, grad_ent, entropy = vec(lse), vec(grad), vec(grad_ent), vec(entropy)
    native.call("dqo_logits_grad", native.dtype_code(logits.dtype), logits.data_ptr(),
                logits.stride(0), targets.data_ptr(), lse.data_ptr(), grad.data_ptr(),
                _ptr(grad_ent), _ptr(entropy), N, V, int(v0), float(inv_temp),
                native.dtype_code(out.dtype), out.data_ptr(), out.stride(0),
                torch.get_num_threads(), native.LOGPROB_MIN_WORK_PER_THREAD)
    return out
