"""Build and load the native CPU ops (``csrc/``): the fused DQO loss and the log-prob launchers.

The kernels are plain C++ behind a C interface (``csrc/module.cpp``), with no torch headers:
one compiler call of about a second builds them, and ctypes loads them (the launchers pass
tensors' data pointers). Two ways in, tried in this order:

1. The library built at install (``setup.py``'s ``build_ext``, also under pip's build
   isolation, since building needs no torch), in the package directory.
2. A build on first use into a cache directory (``DQO_KERNELS_CACHE``, default
   ``$XDG_CACHE_HOME/dqo_kernels`` or ``~/.cache/dqo_kernels``).

Either library is named after what it was built from, ``_native_<isa>_<digest>``: the digest
covers every file of ``csrc/``, the compiler flags and the C interface's version, so an edited
source, a changed flag or another ISA never loads a stale library, and the name alone says
whether one fits. ``isa`` is ``avx2`` on x86 CPUs with AVX2, FMA and F16C (8-wide vectors), else
``base``; an AVX2 library is never loaded on a CPU without AVX2.

A build writes to a temporary file of its own and renames it into place (atomic), so no lock is
needed and none can be left behind: a build killed at any moment leaves only its temporary file
(removed by a later build), concurrent builders each finish and the last rename wins with the
same bytes, and nobody waits on anybody. A compile that takes long says so every
``WAIT_REPORT_S``. Where no compiler works, :func:`is_available` is False, one warning says why,
and the callers fall back to PyTorch. ``DQO_KERNELS_DISABLE_CPP=1`` turns the native ops off.

This file imports only the standard library at module level: ``setup.py`` loads it by path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import List, Optional

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_library_path: Optional[str] = None
_error: Optional[BaseException] = None
_functions: dict = {}  # name -> the loaded library's function

SOURCES = ("module.cpp",)  # the one translation unit; it includes the others
INCLUDED = ("common.h", "dqo_scan.cpp", "logprobs.cpp")
# -ffp-contract=fast: FMAs (ISO C++ modes leave them off); -fno-trapping-math: selects become
# blends (nothing here reads floating-point exception flags); -Wno-psabi: the 32-byte vectors of
# common.h never cross a function boundary of the library, so GCC's ABI note does not apply.
CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp-simd",
          "-shared", "-fPIC", "-pthread", "-Wno-psabi")
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma", "-mf16c"), "base": ()}
ABI_VERSION = 3  # csrc/module.cpp's dqo_abi_version()
PREFIX = "_native_"
PREBUILT_DIR = Path(__file__).resolve().parent  # where setup.py puts the library
WAIT_REPORT_S = 30.0  # how often a long compile says that it is still compiling
# Elements of work a thread must get, else the call runs on fewer threads: a thread start
# costs ~20-50 us, about 16k elements of the scan (~5 ns each) or 64k of a log-prob pass
# (~1 ns each), so no thread is started for less work than that.
MIN_WORK_PER_THREAD = 16384
LOGPROB_MIN_WORK_PER_THREAD = 65536

_i64, _dbl, _int, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "dqo_abi_version": [],
    "dqo_scan_forward": [_int, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _int, _i64],
    "dqo_lse_forward": [_int, _ptr, _i64, _ptr, _i64, _i64, _i64, _dbl, _ptr, _ptr, _ptr, _int,
                        _i64],
    "dqo_logits_grad": [_int, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _dbl,
                        _int, _ptr, _i64, _int, _i64],
}
_STATUS = {1: "unsupported dtype", 2: "the kernel failed (out of memory?)"}
DATA_CHECK = 3  # a status that is not an error: the kernel flagged a possible bad input


class NativeBuildError(RuntimeError):
    """The compiler failed; the message holds its command and output."""


def source_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source tree
        if all((candidate / s).is_file() for s in (*SOURCES, *INCLUDED)):
            return candidate
    raise FileNotFoundError(
        f"{', '.join((*SOURCES, *INCLUDED))} not found next to {here} (looked in csrc/)")


def isa_tag() -> str:
    """``avx2`` on an x86 CPU with AVX2, FMA and F16C (read from /proc/cpuinfo), else ``base``;
    ``DQO_KERNELS_ISA=base`` forces the baseline build."""
    forced = os.environ.get("DQO_KERNELS_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"DQO_KERNELS_ISA: expected one of {sorted(ISA_FLAGS)}, got "
                             f"{forced!r}")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "base"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "base"
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return "avx2" if {"avx2", "fma", "f16c"} <= flags else "base"
    return "base"


def library_stem(isa: Optional[str] = None, src: Optional[Path] = None) -> str:
    """``_native_<isa>_<digest>``: what a library built from ``src`` for ``isa`` is named."""
    isa = isa or isa_tag()
    src = src or source_dir()
    h = hashlib.sha256()
    for name in (*SOURCES, *INCLUDED):
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    h.update(repr((CFLAGS, ISA_FLAGS[isa], ABI_VERSION, platform.machine())).encode())
    return f"{PREFIX}{isa}_{h.hexdigest()[:16]}"


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    return cxx


def compile_command(out: Path, isa: Optional[str] = None,
                    src: Optional[Path] = None) -> List[str]:
    src = src or source_dir()
    return [*compiler().split(), *CFLAGS, *ISA_FLAGS[isa or isa_tag()],
            *(str(src / s) for s in SOURCES), "-o", str(out)]


def cache_dir() -> Path:
    env = os.environ.get("DQO_KERNELS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dqo_kernels"


def _say(msg: str) -> None:
    """Warn through logging and on stderr: a wait that nobody sees looks like a hang."""
    _log.warning(msg)
    if _log.hasHandlers():  # without handlers, logging's last resort already prints to stderr
        print(msg, file=sys.stderr, flush=True)


def _host() -> str:
    return socket.gethostname().replace(".", "-")  # one field of the temporary file's name


def _remove_dead_temporaries(directory: Path, stem: str) -> None:
    """Remove the temporary files of builds on this host whose process is gone (killed)."""
    host = _host()
    for tmp in directory.glob(f".{stem}.*.tmp"):
        parts = tmp.name.split(".")  # .<stem>.<host>.<pid>.<uuid>.tmp
        if len(parts) < 6 or parts[-4] != host:
            continue
        try:
            os.kill(int(parts[-3]), 0)
            continue  # alive: still compiling
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        try:
            tmp.unlink()
            _log.info("dqo_kernels: removed %s, left by a build that was killed", tmp)
        except OSError:
            pass


def build(out: Path, isa: Optional[str] = None, src: Optional[Path] = None,
          verbose: bool = False) -> Path:
    """Compile the native library into ``out``, atomically: a temporary file of this process,
    renamed into place once complete. Raises :class:`NativeBuildError` if the compiler fails."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name.split(".")[0]
    _remove_dead_temporaries(out.parent, stem)
    tmp = out.parent / f".{stem}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    cmd = compile_command(tmp, isa, src)
    if verbose:
        print(" ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise NativeBuildError(f"could not run the compiler ({' '.join(cmd)}): {exc}") from exc
    try:
        while True:
            try:
                output, _ = proc.communicate(timeout=WAIT_REPORT_S)
                break
            except subprocess.TimeoutExpired:
                _say(f"dqo_kernels: still compiling the native CPU kernels into {out} "
                     f"({time.monotonic() - t0:.0f} s so far; a busy machine compiles slowly)")
        if proc.returncode != 0:
            raise NativeBuildError(f"the compiler failed (exit {proc.returncode}):\n"
                                   f"{' '.join(cmd)}\n{output.decode(errors='replace')}")
        os.replace(tmp, out)
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): stop our compiler too
            proc.kill()
            proc.wait()
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _log.info("dqo_kernels: built %s in %.1f s", out, time.monotonic() - t0)
    return out


def _find_prebuilt() -> Optional[Path]:
    """The library built at install for this CPU (or a baseline one), if any."""
    if os.environ.get("DQO_KERNELS_FORCE_JIT", "0") == "1":
        return None
    for isa in dict.fromkeys((isa_tag(), "base")):  # a baseline library runs anywhere
        found = sorted(PREBUILT_DIR.glob(f"{library_stem(isa)}*.so"))
        if found:
            return found[0]
    return None


def _cached_or_built(verbose: bool) -> Path:
    name = f"{library_stem()}.so"
    path = cache_dir() / name
    if path.is_file():
        return path
    try:
        return build(path, verbose=verbose)
    except PermissionError as exc:  # a read-only home: the temp dir instead
        path = Path(tempfile.gettempdir()) / f"dqo_kernels-{os.getuid()}" / name
        _log.warning("dqo_kernels: cannot write %s (%s); using %s", cache_dir(), exc, path)
        return path if path.is_file() else build(path, verbose=verbose)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    if lib.dqo_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: C interface version {lib.dqo_abi_version()}, expected "
                           f"{ABI_VERSION}")
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
            path = _find_prebuilt()
            if path is None:
                path = _cached_or_built(verbose)
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
