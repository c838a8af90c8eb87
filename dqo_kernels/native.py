"""Build and load the native CPU ops (``csrc/``): the fused DQO loss and the log-prob launchers.

The extension is compiled with ``torch.utils.cpp_extension`` on first use (about half a minute,
once; torch caches it per torch version, source hash and flags). On a CPU with AVX2 and FMA it is
built for them, so that ``at::vec`` uses 8-wide vectors and Sleef's exp; elsewhere it is built
for the baseline ISA (correct, slower). Where no compiler works, :func:`is_available` is False,
one warning says why, and the callers fall back to PyTorch. ``DQO_KERNELS_DISABLE_CPP=1``
turns the native ops off.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_ext = None
_error: Optional[BaseException] = None
SOURCES = ("dqo_scan.cpp", "logprobs.cpp", "bindings.cpp")


def _source_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source tree
        if all((candidate / s).is_file() for s in SOURCES):
            return candidate
    raise FileNotFoundError(f"{', '.join(SOURCES)} not found next to {here} (looked in csrc/)")


def isa_flags() -> List[str]:
    """Compiler flags for this machine's vector ISA, as torch itself detected it."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        # 256-bit at::vec on AVX-512 machines too: one code path to test, and no clock drop.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


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

            _log.info("dqo_kernels: building the native CPU kernels (first use only)")
            src = _source_dir()
            _ext = load(
                name="dqo_kernels_cpu",
                sources=[str(src / s) for s in SOURCES],
                extra_cflags=["-O3", "-fopenmp", *isa_flags()],
                extra_include_paths=[str(src)],
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # no compiler, no headers, ...
            _error = exc
            raise
        return _ext


def is_available() -> bool:
    """True if the native ops can be used; warns once with the reason if not."""
    if os.environ.get("DQO_KERNELS_DISABLE_CPP", "0") == "1":
        return False
    try:
        load_extension()
        return True
    except Exception as exc:
        if not getattr(is_available, "_warned", False):
            is_available._warned = True
            warnings.warn(
                f"dqo_kernels: the native CPU kernels could not be built ({type(exc).__name__}: "
                f"{exc}); falling back to PyTorch, which is slower.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
