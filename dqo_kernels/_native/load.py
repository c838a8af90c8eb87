"""Load the native CPU ops (built by :mod:`.build`) with ctypes, and call them.

The C interface is declared here once: each function's argument types (``_SIGNATURES``) and the
structs passed by pointer, :class:`DqoHyper` and :class:`DqoLossTensors`, which mirror the
structs of the same names in ``csrc/dqo_loss.cpp`` field by field. A library whose interface
version or struct sizes differ is refused when it is opened.

Like :mod:`.build`, this file needs no torch: the launchers (``dqo_loss/cpp.py``,
``logprobs/cpp.py``) pass tensors' data pointers.
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

from . import build

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_library_path: Optional[str] = None
_error: Optional[BaseException] = None
_functions: dict = {}  # name -> the loaded library's function

# Elements of work a thread must get, else the call runs on fewer threads: a thread start
# costs ~20-50 us, about 16k elements of the scan (~5 ns each) or 64k of a log-prob pass
# (~1 ns each), so no thread is started for less work than that.
MIN_WORK_PER_THREAD = 16384
LOGPROB_MIN_WORK_PER_THREAD = 65536

_i64, _i32, _dbl, _int, _ptr = (ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_int,
                                ctypes.c_void_p)


class DqoHyper(ctypes.Structure):
    """``struct DqoHyper`` of csrc/dqo_loss.cpp: the scalars of one fused DQO loss call."""

    _fields_ = [
        ("beta", _dbl),
        ("lam", _dbl),
        ("gamma", _dbl),
        ("log_clip", _dbl),  # log C; inf: no cap
        ("logprob_tol", _dbl),  # the data checks' log-prob tolerance
        ("log_limit", _dbl),  # the data checks' largest log-weight; inf: not checked
        ("num_tokens", _dbl),  # token-mean's global count; <= 0: the mask's count
        ("is_policy", _i32),
        ("is_value", _i32),
        ("target_grad", _i32),
        ("check", _i32),  # look for inputs that the data checks may refuse
        ("loss_agg", _i32),  # LOSS_AGG_CODES; used only without a row_scale
    ]


# loss_agg -> csrc/dqo_loss.cpp's LossAgg code
LOSS_AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2}

# Inputs, then outputs; every one a data pointer of the compute dtype unless noted.
DQO_LOSS_INPUTS = ("logp", "ref_logp", "behavior_logp", "values", "rewards",
                   "mask",  # uint8 (a bool tensor's bytes)
                   "bootstrap",  # [B], or null: 0 after the last action
                   "row_scale")  # [B], or null: computed from the mask and loss_agg
DQO_LOSS_OUTPUTS = ("returns", "weights", "td_error", "dlogp", "dvalues",  # [B, T]
                    "policy_rows", "value_rows",  # [B]
                    "policy_loss", "value_loss")  # scalars: the rows' sums, in row order


class DqoLossTensors(ctypes.Structure):
    """``struct DqoLossTensors`` of csrc/dqo_loss.cpp: the buffers of one fused DQO loss call,
    contiguous ``[B, T]`` unless noted in ``DQO_LOSS_INPUTS`` / ``DQO_LOSS_OUTPUTS``."""

    _fields_ = [(name, _ptr) for name in (*DQO_LOSS_INPUTS, *DQO_LOSS_OUTPUTS)]


_STRUCTS = (DqoHyper, DqoLossTensors)  # csrc/module.cpp's dqo_struct_size(i), in this order

_SIGNATURES = {
    "dqo_abi_version": [],
    "dqo_struct_size": [_int],
    "dqo_loss_forward": [_int, ctypes.POINTER(DqoLossTensors), ctypes.POINTER(DqoHyper), _i64,
                         _i64, _int, _i64],
    "dqo_lse_forward": [_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _dbl, _ptr, _ptr, _ptr, _int,
                        _i64],
    "dqo_logits_grad": [_int, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _dbl,
                        _int, _ptr, _i64, _int, _i64],
}
_STATUS = {1: "unsupported dtype", 2: "the kernel failed (out of memory?)"}
DATA_CHECK = 3  # a status that is not an error: the kernel flagged a possible bad input


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    if lib.dqo_abi_version() != build.ABI_VERSION:
        raise RuntimeError(f"{path}: C interface version {lib.dqo_abi_version()}, expected "
                           f"{build.ABI_VERSION}")
    for i, struct in enumerate(_STRUCTS):
        if lib.dqo_struct_size(i) != ctypes.sizeof(struct):
            raise RuntimeError(f"{path}: struct {struct.__name__} is {lib.dqo_struct_size(i)} "
                               f"bytes there, {ctypes.sizeof(struct)} in {__name__}")
    return lib


def load_library(verbose: bool = False) -> ctypes.CDLL:
    """The native library: the one built at install if it fits, else the cached build, else
    built now (about a second, once); raises if none of them is possible."""
    global _lib, _error, _library_path
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise _error
        try:
            path = build._find_prebuilt()
            if path is None:
                path = build._cached_or_built(verbose)
            _lib, _library_path = _open(path), str(path)
        except Exception as exc:  # no compiler, a read-only cache, ...
            _error = exc
            raise
        return _lib


def library_path() -> Optional[str]:
    """The file the native ops were loaded from, once :func:`load_library` succeeded."""
    return _library_path


def call(name: str, *args) -> int:
    """Call a native op; its status (0, or DATA_CHECK); another is a RuntimeError naming it."""
    fn = _functions.get(name)
    if fn is None:
        fn = _functions[name] = getattr(load_library(), name)
    status = fn(*args)
    if status not in (0, DATA_CHECK):
        raise RuntimeError(f"dqo_kernels native op {name}: {_STATUS.get(status, status)}")
    return status


def is_available() -> bool:
    """True if the native ops can be used; warns once with the reason if not."""
    if os.environ.get("DQO_KERNELS_DISABLE_CPP", "0") == "1":
        return False
    try:
        load_library()
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


# dtype -> csrc/common.h's Dtype code, by name so that this file needs no torch at import
DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


def dtype_code(dtype) -> int:
    """The C interface's code of a torch dtype."""
    return DTYPE_CODES[str(dtype).replace("torch.", "")]
