"""Input checks for the public ops: every error is a ValueError that names the argument, what
was expected and what was given.

Shape, dtype, device and hyper-parameter checks are free. The data checks (finite values, a
0/1 mask, no reward off the mask) read the tensors and, on a GPU, cost one synchronisation per
call; they are on by default and can be turned off for throughput with
``dqo_kernels.set_data_checks(False)`` or ``DQO_KERNELS_DATA_CHECKS=0``.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Dict, Optional, Sequence

import torch

_data_checks = os.environ.get("DQO_KERNELS_DATA_CHECKS", "1") != "0"


def set_data_checks(enabled: bool) -> None:
    """Turn the value checks (NaN/inf, mask values, rewards off the mask) on or off."""
    global _data_checks
    _data_checks = bool(enabled)


def data_checks_enabled() -> bool:
    return _data_checks


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, *, shape: Optional[Sequence[int]] = None, floating: bool = True,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(x)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {_describe(x)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of logp), "
                         f"got {_describe(x)}")


def check_mask(mask, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Validate an action mask and return it as bool (bool, integer or float 0/1 accepted)."""
    check_tensor("mask", mask, shape=shape, floating=False, device=device)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"mask: expected bool or 0/1 values, got {_describe(mask)}")
    if _data_checks and bool(((mask != 0) & (mask != 1)).any()):
        bad = torch.nonzero((mask != 0) & (mask != 1))[0].tolist()
        raise ValueError(f"mask: expected only 0/1 values, got {mask[tuple(bad)].item()} "
                         f"at index {tuple(bad)}")
    return mask != 0


def check_scalar(name: str, value, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_triton_backend(device: torch.device) -> None:
    """Raise unless the Triton backend can run on ``device``: triton installed, and CUDA tensors
    or (tests, CPU) the interpreter, ``TRITON_INTERPRET=1``."""
    if not triton_available():
        raise ValueError("backend: 'triton' requested but triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                         "interpreter), got tensors on cpu")


def check_values(tensors: Dict[str, Optional[torch.Tensor]], mask: torch.Tensor,
                 rewards: Optional[torch.Tensor] = None,
                 whole: Sequence[str] = ()) -> None:
    """Finite values on action positions (everywhere for names in ``whole``) and no reward
    off the mask. One host synchronisation for all checks together."""
    if not _data_checks:
        return
    names, flags = [], []
    for name, x in tensors.items():
        if x is None:
            continue
        bad = ~torch.isfinite(x)
        if name not in whole and x.shape == mask.shape:
            bad = bad & mask
        names.append(name)
        flags.append(bad.any())
    if rewards is not None:
        names.append("rewards@mask")
        flags.append(((rewards != 0) & ~mask).any())
    if not flags:
        return
    failed = torch.stack(flags).tolist()
    for name, bad in zip(names, failed):
        if not bad:
            continue
        if name == "rewards@mask":
            idx = tuple(torch.nonzero((rewards != 0) & ~mask)[0].tolist())
            raise ValueError(
                f"rewards: expected 0 on positions where mask is 0 (they are not actions), got "
                f"{rewards[idx].item()} at index {idx}; put rewards on action tokens")
        x = tensors[name]
        bad_t = ~torch.isfinite(x)
        if name not in whole and x.shape == mask.shape:
            bad_t = bad_t & mask
        idx = tuple(torch.nonzero(bad_t)[0].tolist())
        where = "" if name in whole or x.shape != mask.shape else " on an action position"
        raise ValueError(f"{name}: expected finite values, got {x[idx].item()} at index "
                         f"{idx}{where}")
