"""Launcher of the native CPU kernel of the fused DQO loss (``csrc/dqo_scan.cpp``).

The extension is compiled with ``torch.utils.cpp_extension`` on first use (about half a
minute, once; torch caches it per torch version and source hash). Where no compiler works,
:func:`is_available` is False, one warning says why, and the auto backend uses the reference.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

from .dqo_scan_reference import log_clip
from .dtypes import acc_dtype

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_ext = None
_error: Optional[BaseException] = None


def _source_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source tree
        if (candidate / "dqo_scan.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"dqo_scan.cpp not found next to {here} (looked in csrc/)")


def load_extension(verbose: bool = False):
    """Compile (first time) and import the extension; raises if that is impossible."""
    global _ext, _error
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise _error
        try:
            from torch.utils.cpp_extension import load

            _log.info("dqo_kernels: building the native CPU kernel (first use only)")
            flags = ["-O3", "-fopenmp"]
            _ext = load(
                name="dqo_kernels_cpu",
                sources=[str(_source_dir() / "dqo_scan.cpp")],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # no compiler, no headers, ...
            _error = exc
            raise
        return _ext


def is_available() -> bool:
    """True if the native kernel can be used; warns once with the reason if not."""
    if os.environ.get("DQO_KERNELS_DISABLE_CPP", "0") == "1":
        return False
    try:
        load_extension()
        return True
    except Exception as exc:
        if not getattr(is_available, "_warned", False):
            is_available._warned = True
            warnings.warn(
                f"dqo_kernels: the native CPU kernel could not be built ({type(exc).__name__}: "
                f"{exc}); falling back to the PyTorch reference, which is slower.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False


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
