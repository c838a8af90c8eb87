"""Build the native CPU ops (``csrc/``): the fused DQO loss and the log-prob launchers, and find
the library to load (:mod:`.load` loads it).

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
``WAIT_REPORT_S``. Where no compiler works, :func:`.load.is_available` is False, one warning says
why, and the callers fall back to PyTorch. ``DQO_KERNELS_DISABLE_CPP=1`` turns the native ops off.

This file imports only the standard library at module level: ``setup.py`` loads it by path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional

_log = logging.getLogger(__name__)

SOURCES = ("module.cpp",)  # the one translation unit; it includes the others
INCLUDED = ("common.h", "dqo_loss.cpp", "logprobs.cpp")
# -ffp-contract=fast: FMAs (ISO C++ modes leave them off); -fno-trapping-math: selects become
# blends (nothing here reads floating-point exception flags); -Wno-psabi: the 32-byte vectors of
# common.h never cross a function boundary of the library, so GCC's ABI note does not apply.
CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp-simd",
          "-shared", "-fPIC", "-pthread", "-Wno-psabi")
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma", "-mf16c"), "base": ()}
ABI_VERSION = 4  # csrc/module.cpp's dqo_abi_version()
PREFIX = "_native_"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # dqo_kernels/
PREBUILT_DIR = PACKAGE_DIR  # where setup.py puts the library
WAIT_REPORT_S = 30.0  # how often a long compile says that it is still compiling


class NativeBuildError(RuntimeError):
    """The compiler failed; the message holds its command and output."""


def source_dir() -> Path:
    here = PACKAGE_DIR
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
