"""The device guard of every kernel launch (as flash-linear-attention's ``input_guard``).

A Triton launch runs on the *current* CUDA device, not on the device of its tensors: with
tensors on ``cuda:1`` while ``cuda:0`` is current (one process driving several GPUs, or a
library that changed the current device), the kernel would read another GPU's addresses.
:func:`device_guard` makes the tensors' device current for the launch.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def device_of(*args, **kwargs):
    """The device of the first tensor among the arguments, or None."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def device_context(device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device, else nothing to do."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def device_guard(fn: F) -> F:
    """Run ``fn`` with the device of its first tensor argument current (CUDA only)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with device_context(device_of(*args, **kwargs)):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
