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
source, a changed flag or another ISA never loads a stale library. ``isa`` is ``avx2`` on x86
CPUs with AVX2, FMA and F16C (8-wide vectors), else ``base``. A library built on first use adds
``_<build>``: a digest of the compiler command (``$CXX``, ``$CXXFLAGS``) and of the CPU features
its code needs, as the compiler resolves them (``-march=native`` on an AVX-512 host needs
``avx512f``): hosts that share a cache (an NFS home) each get their own library.

Every library has a record beside it (``<library>.json``: its size, sha256, the CPU flags its
code needs, the command), written at build. A library is loaded only if it matches its record
and this CPU has those flags (``/proc/cpuinfo``): a cut or damaged file, or one built for
another CPU, is rebuilt, never loaded (a cut library kills the process with SIGBUS, a foreign
one with SIGILL).

A build writes to a temporary file of its own, fsyncs it and renames it into place (atomic),
so no lock is needed and none can be left behind: a build killed at any moment leaves only its
temporary file (removed by a later build), concurrent builders each finish and the last rename
wins, and nobody waits on anybody. A compile that takes long says so every ``WAIT_REPORT_S``.
A cache directory that cannot be written (read-only, not a directory) is replaced by a private
one in the temp directory (``dqo_kernels-<uid>``, mode 0700, used only if this user owns it and
nobody else can write to it). Where no compiler works, :func:`.load.is_available` is False, one
warning says why, and the callers fall back to PyTorch. ``DQO_KERNELS_DISABLE_CPP=1`` turns the
native ops off.

This file imports only the standard library at module level: ``setup.py`` loads it by path.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import FrozenSet, List, Optional, Tuple

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
RECORD_SUFFIX = ".json"  # <library><suffix>: what the build recorded about the library
# the compiler's predefined macros -> the /proc/cpuinfo flag of the instructions they allow
MACRO_CPU_FLAGS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm",
    "__MOVBE__": "movbe", "__ADX__": "adx", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVXVNNI__": "avx_vnni", "__AMX_TILE__": "amx_tile",
}


class NativeBuildError(RuntimeError):
    """The compiler failed; the message holds its command and output."""


def source_dir() -> Path:
    here = PACKAGE_DIR
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source tree
        if all((candidate / s).is_file() for s in (*SOURCES, *INCLUDED)):
            return candidate
    raise FileNotFoundError(
        f"{', '.join((*SOURCES, *INCLUDED))} not found next to {here} (looked in csrc/)")


def host_cpu_flags() -> Optional[FrozenSet[str]]:
    """This CPU's feature flags (``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


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
    flags = host_cpu_flags()
    return "avx2" if flags is not None and {"avx2", "fma", "f16c"} <= flags else "base"


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


def _flags(isa: Optional[str]) -> List[str]:
    """The compiler and every flag of a build for ``isa``: ``$CXX`` (which may carry flags of
    its own), ours, then ``$CXXFLAGS`` (which may add ``-march=...``)."""
    return [*compiler().split(), *CFLAGS, *ISA_FLAGS[isa or isa_tag()],
            *os.environ.get("CXXFLAGS", "").split()]


def compile_command(out: Path, isa: Optional[str] = None,
                    src: Optional[Path] = None) -> List[str]:
    src = src or source_dir()
    return [*_flags(isa), *(str(src / s) for s in SOURCES), "-o", str(out)]


@functools.lru_cache(maxsize=None)
def _predefined_cpu_flags(flags: Tuple[str, ...]) -> FrozenSet[str]:
    try:
        proc = subprocess.run([*flags, "-dM", "-E", "-x", "c++", os.devnull],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"could not run the compiler ({' '.join(flags)}): {exc}") from exc
    if proc.returncode != 0:
        raise NativeBuildError(f"the compiler failed (exit {proc.returncode}):\n"
                               f"{' '.join(flags)} -dM -E\n{proc.stderr}")
    defined = {line.split()[1] for line in proc.stdout.splitlines()
               if line.startswith("#define ") and len(line.split()) > 1}
    return frozenset(flag for macro, flag in MACRO_CPU_FLAGS.items() if macro in defined)


def required_cpu_flags(isa: Optional[str] = None) -> FrozenSet[str]:
    """The CPU flags (``/proc/cpuinfo`` names) that code built for ``isa`` with this compiler
    command needs, from the compiler's own predefined macros: ``-march=native`` resolves to
    whatever the building host has."""
    return _predefined_cpu_flags(tuple(_flags(isa)))


def build_tag(isa: Optional[str] = None) -> str:
    """A digest of the compiler command and of the CPU flags its code needs (the cache name's
    last field): another ``$CXX``, ``$CXXFLAGS`` or a ``-march=native`` that resolves to other
    instructions gives another library."""
    key = repr((_flags(isa), sorted(required_cpu_flags(isa))))
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def cache_name(isa: Optional[str] = None) -> str:
    """The file name of the library built on first use, for this compiler command."""
    isa = isa or isa_tag()
    return f"{library_stem(isa)}_{build_tag(isa)}.so"


def record_path(library: Path) -> Path:
    return Path(str(library) + RECORD_SUFFIX)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_record(library: Path, cpu_flags, command: List[str], record: Optional[Path] = None):
    """Write what :func:`check_library` compares a library with (to ``record``, default the
    library's own record path), atomically."""
    library = Path(library)
    data = dict(size=library.stat().st_size, sha256=_digest(library),
                cpu_flags=sorted(cpu_flags), command=command)
    _atomic_write_text(record or record_path(library), json.dumps(data, indent=1))


def check_library(library: Path) -> Optional[str]:
    """Why ``library`` must not be loaded (no record, another size or digest than its record,
    CPU flags this CPU lacks), or None if it can be."""
    library = Path(library)
    try:
        record = json.loads(record_path(library).read_text())
        size, digest, needs = record["size"], record["sha256"], set(record["cpu_flags"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable record of its build ({record_path(library).name}: {exc})"
    try:
        actual = library.stat().st_size
    except OSError as exc:
        return f"not readable ({exc})"
    if actual != size:
        return f"{actual} bytes, its build wrote {size} (cut or replaced)"
    if _digest(library) != digest:
        return "its sha256 differs from its build's (damaged)"
    host = host_cpu_flags()
    if host is not None and not needs <= host:
        return f"built for CPU features this CPU lacks ({', '.join(sorted(needs - host))})"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a directory on a platform or filesystem that cannot: the rename is all
        pass
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` over ``out`` with its data, then the rename, on the disk: a power loss
    never leaves a library of zeros under the final name. (``dqo.atomic`` does the same for the
    trainer; this file keeps to the standard library, so it has its own three lines.)"""
    _fsync(tmp)
    os.replace(tmp, out)
    _fsync(out.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(text)
        _durable_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
        # the record first: a kill before the rename leaves a record that the old library
        # (or none) fails, so the next process rebuilds
        write_record(tmp, required_cpu_flags(isa), compile_command(out, isa, src),
                     record=record_path(out))
        _durable_replace(tmp, out)
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
    """The library built at install for this CPU (or a baseline one) that matches its record
    (:func:`check_library`), if any."""
    if os.environ.get("DQO_KERNELS_FORCE_JIT", "0") == "1":
        return None
    for isa in dict.fromkeys((isa_tag(), "base")):  # a baseline library runs anywhere
        for found in sorted(PREBUILT_DIR.glob(f"{library_stem(isa)}*.so")):
            why = check_library(found)
            if why is None:
                return found
            _log.info("dqo_kernels: not loading %s: %s", found, why)
    return None


def _writable(directory: Path) -> Optional[OSError]:
    """None if files can be created in ``directory`` (made if missing), else why not: a
    read-only filesystem (EROFS), no permission, a file in the way."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def _private(directory: Path) -> Optional[str]:
    """Why ``directory`` is not safe to load code from (None if it is): it must be a real
    directory (no symlink), owned by this user, that nobody else can write to."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_temp_dir() -> Path:
    """``<tmp>/dqo_kernels-<uid>``, made with mode 0700; if it exists but another user owns it
    or others can write to it (planted to make us load their library), a fresh ``mkdtemp``
    directory instead, with a warning."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"dqo_kernels-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    why = _private(path)
    if why is None:
        return path
    fresh = Path(tempfile.mkdtemp(prefix=f"dqo_kernels-{uid}-"))
    _log.warning("dqo_kernels: not using %s (%s); building in %s", path, why, fresh)
    return fresh


def _cached_or_built(verbose: bool) -> Path:
    directory = cache_dir()
    unwritable = _writable(directory)
    if unwritable is not None:  # a read-only home: the temp dir instead
        fallback = private_temp_dir()
        _log.warning("dqo_kernels: cannot write %s (%s); using %s", directory, unwritable,
                     fallback)
        directory = fallback
    path = directory / cache_name()
    if path.is_file():
        why = check_library(path)
        if why is None:
            return path
        _say(f"dqo_kernels: rebuilding {path}: {why}")
    return build(path, verbose=verbose)
