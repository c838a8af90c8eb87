"""Which implementation runs an op: the one resolver shared by the fused DQO loss and the
log-prob ops, so that both choose, check and fall back the same way."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ._native import load as native
from .validation import check_triton_backend, triton_available

BACKENDS = ("triton", "cpp", "torch")


# Constants of the process: torch.compile evaluates them once while tracing instead of
# tracing into a build lock and an import.
@torch.compiler.assume_constant_result
def _native_available() -> bool:
    return native.is_available()


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    return triton_available()

_fallback_warned: set = set()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that will run: the requested one (checked), or the best for ``device``:
    Triton on CUDA, the native kernels on CPU, PyTorch where neither can run."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            check_triton_backend(device)
        if backend == "cpp":
            if device.type != "cpu":
                raise ValueError(f"backend: 'cpp' needs CPU tensors, got tensors on {device}")
            if not _native_available():
                raise ValueError("backend: 'cpp' needs the native CPU kernels, which could not "
                                 "be built here (see the warning above)")
        return backend
    if device.type == "cuda":
        if _triton_available():
            return "triton"
        if not _fallback_warned:
            _fallback_warned.add(device.type)
            warnings.warn("dqo_kernels: triton is not installed; the ops run in PyTorch on "
                          "CUDA tensors (slow)", RuntimeWarning, stacklevel=3)
    elif device.type == "cpu" and _native_available():
        return "cpp"
    return "torch"
