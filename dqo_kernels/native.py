"""Build and load the native CPU ops (``csrc/``): the fused DQO loss and the log-prob launchers.

Two ways in, tried in this order:

1. The library prebuilt at install (``setup.py``, when torch is importable there, e.g.
   ``pip install --no-build-isolation``). Its name says what it was built for,
   ``_C_torch<version>_<isa>`` (see :func:`prebuilt_module_name`), so that it is chosen before
   it is loaded: one built for another torch, or with AVX2 on a CPU without it, is never
   loaded (that could crash, not just raise); the JIT build below is used instead.
   ``DQO_KERNELS_FORCE_JIT=1`` skips it.
2. A just-in-time build with ``torch.utils.cpp_extension.load`` (seconds to minutes, once;
   torch caches it under ``TORCH_EXTENSIONS_DIR`` per source hash and flags). torch guards that
   build with a ``lock`` file and, if a process is killed mid-build, every later process waits
   on the leftover lock forever, silently. :func:`_build_guard` prevents this: our builders
   hold an ``fcntl.flock`` on an owner file (pid, host, start time) for the whole build, so a
   ``lock`` found while we hold that flock was left by a dead builder and is removed, with a
   warning naming it, and the compilers that builder left running are killed. Waits on a live
   builder are reported every 30 s.

On a CPU with AVX2 and FMA the ops are built for them, so that ``at::vec`` uses 8-wide vectors
and Sleef's exp; elsewhere for the baseline ISA (correct, slower). Where no compiler works,
:func:`is_available` is False, one warning says why, and the callers fall back to PyTorch.
``DQO_KERNELS_DISABLE_CPP=1`` turns the native ops off.

Either way the ops register with torch's dispatcher as ``torch.ops.dqo_kernels.*``
(``csrc/module.cpp``), which is what :func:`load_extension` returns. This file imports only
the standard library at module level: ``setup.py`` loads it by path for the names and flags,
so that the prebuilt and the JIT library are built alike.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_ext = None
_library_path: Optional[str] = None
_error: Optional[BaseException] = None
# One translation unit (see csrc/module.cpp); the others are included by it.
SOURCES = ("module.cpp",)
INCLUDED = ("dqo_scan.cpp", "logprobs.cpp", "ops.h")
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
JIT_NAME = "dqo_kernels_cpu"
OWNER_FILE = "lock.owner"  # next to torch's <build_dir>/lock
WAIT_REPORT_S = 30.0  # how often a waiting process says what it waits for
# A lock without any owner record comes from a builder that is not ours (torch's own load, an
# older dqo_kernels); we cannot ask it whether it is alive, so it is stale only when this old.
STALE_AGE_S = 600.0
BUILDER_ENV = "DQO_KERNELS_BUILDER"  # marks the processes of our build (see _processes_of)


def _source_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed wheel, source tree
        if all((candidate / s).is_file() for s in (*SOURCES, *INCLUDED)):
            return candidate
    raise FileNotFoundError(
        f"{', '.join((*SOURCES, *INCLUDED))} not found next to {here} (looked in csrc/)")


def _sources_digest(src: Path) -> str:
    """Hash of every file the build reads: torch's JIT rebuild check hashes only the listed
    ``sources``, so an edit of an included file must change the flags instead."""
    h = hashlib.sha256()
    for name in (*SOURCES, *INCLUDED):
        h.update((src / name).read_bytes())
    return h.hexdigest()[:16]


def isa_flags() -> List[str]:
    """Compiler flags for this machine's vector ISA, as torch itself detected it."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        # 256-bit at::vec on AVX-512 machines too: one code path to test, and no clock drop.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def isa_tag() -> str:
    """``avx2`` or ``base``: the ISA :func:`isa_flags` builds for on this machine."""
    return "avx2" if isa_flags() else "base"


def prebuilt_module_name(isa: Optional[str] = None) -> str:
    """Name of the install-time module for the running torch and ``isa`` (default: this CPU's),
    e.g. ``_C_torch2_13_0_cpu_avx2``; the Python ABI is in the file name's own suffix."""
    import torch

    return f"_C_torch{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{isa or isa_tag()}"


def _older_than_sources(module: Path) -> bool:
    """True if a source-tree (editable) install's module predates an edit of csrc/.

    An installed wheel is left alone: its sources cannot change, and pip may write them a
    moment after the module."""
    here = Path(__file__).resolve().parent
    src = here.parent / "csrc"
    if (here / "csrc").is_dir() or not src.is_dir():  # a wheel's, or no sources at all
        return False
    built = module.stat().st_mtime
    return any(f.stat().st_mtime > built for f in (*src.glob("*.cpp"), *src.glob("*.h")))


def _load_prebuilt():
    """The install-time module if one fits this torch and CPU, else None."""
    if os.environ.get("DQO_KERNELS_FORCE_JIT", "0") == "1":
        return None
    # An AVX2 CPU can run a baseline module (slower); a baseline CPU must never load an AVX2 one.
    for isa in dict.fromkeys((isa_tag(), "base")):
        name = f"{__package__}.{prebuilt_module_name(isa)}"
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if _older_than_sources(Path(spec.origin)):
            _log.warning("dqo_kernels: csrc/ changed since %s was built at install; building "
                         "it again here (pip install --no-build-isolation -e . refreshes it)",
                         spec.origin)
            continue
        try:
            return _load_library(spec.origin)
        except OSError as exc:  # e.g. a libstdc++ older than the build machine's
            _log.warning("dqo_kernels: the prebuilt native library %s does not load (%s); "
                         "building it instead", spec.origin, exc)
    _log.info("dqo_kernels: no prebuilt native module for this torch and CPU")
    return None


class _WaitReport:
    """When a waiting loop is due to say what it waits for: every ``WAIT_REPORT_S``."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.next = self.t0 + WAIT_REPORT_S

    def due(self) -> Optional[float]:
        """Seconds waited so far if a report is due now, else None."""
        now = time.monotonic()
        if now < self.next:
            return None
        self.next += WAIT_REPORT_S
        return now - self.t0


def _say(msg: str) -> None:
    """Warn through logging and on stderr: a wait that nobody sees looks like a hang."""
    _log.warning(msg)
    if _log.hasHandlers():  # without handlers, logging's last resort already prints to stderr
        print(msg, file=sys.stderr, flush=True)


def _read_owner(fd: int) -> Optional[Dict]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None  # mid-write or garbled: only ever used for messages and as "non-empty"


def _write_owner(fd: int, record: Optional[Dict]) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)  # a crash right after must still show the record


def _describe(owner: Optional[Dict]) -> str:
    if not owner:
        return "a process that left no owner record"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"process {owner.get('pid')} on {owner.get('host')} (started {started})"


def _processes_of(token: str, build_dir: Path) -> List[Tuple[int, str]]:
    """(pid, name) of the processes of the build that ran with ``token`` (Linux /proc).

    torch runs ninja and the compilers in ``build_dir``, and they inherit ``BUILDER_ENV=token``
    from their builder: both must match. A builder killed with SIGKILL leaves them running,
    orphaned, still writing the object files that a new build writes too."""
    marker, cwd, out = f"{BUILDER_ENV}={token}".encode(), os.path.realpath(build_dir), []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            if (os.readlink(f"/proc/{pid}/cwd") == cwd
                    and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                out.append((pid, Path(f"/proc/{pid}/comm").read_text().strip()))
        except OSError:  # gone, or another user's
            continue
    return out


def _kill_orphans(owner: Dict, build_dir: Path) -> None:
    """Kill what a dead builder's build left running: its output would be rebuilt anyway, and
    its compilers would race ours on the same files and CPUs."""
    procs = _processes_of(str(owner.get("token")), build_dir)
    if not procs:
        return
    _say(f"dqo_kernels: killing the processes that the build of {_describe(owner)} left "
         f"running: {procs}")
    for pid, _ in procs:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _processes_of(str(owner.get("token")), build_dir) and time.monotonic() < deadline:
        time.sleep(0.1)


def _clear_stale_lock(lock: Path, owner: Optional[Dict]) -> None:
    """Called while holding the owner flock: remove ``lock`` if its builder is gone, else wait.

    ``owner`` is the record found in the owner file. Our builders clear it when their build
    ends, so a record means that its builder died mid-build (we could not have the flock
    otherwise) and the lock, if any, is its own."""
    report = _WaitReport()
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if owner or age > STALE_AGE_S:
            if owner and owner.get("token"):
                _kill_orphans(owner, lock.parent)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            why = (f"{_describe(owner)} died while building" if owner
                   else f"it has no owner record and is {age:.0f} s old")
            _say(f"dqo_kernels: removed the stale build lock {lock}: {why}")
            return
        waited = report.due()
        if waited is not None:
            _say(f"dqo_kernels: waited {waited:.0f} s for the build lock {lock}, "
                 f"held by a builder that is not dqo_kernels (no owner record); it counts as "
                 f"stale {STALE_AGE_S:.0f} s after its creation ({age:.0f} s ago)")
        time.sleep(0.25)


@contextlib.contextmanager
def _build_guard(build_dir: Path) -> Iterator[None]:
    """Hold the build directory for one JIT build: wait for a live builder (reporting every
    ``WAIT_REPORT_S``), remove a dead builder's lock, and leave our own record meanwhile.

    The flock, unlike torch's lock file, is released by the kernel however we die. The owner
    file is never deleted: deleting a flocked file lets two processes lock two different
    files of the same name."""
    lock = build_dir / "lock"
    fd = os.open(build_dir / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        report = _WaitReport()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
            waited = report.due()
            if waited is not None:
                _say(f"dqo_kernels: waited {waited:.0f} s for "
                     f"{_describe(_read_owner(fd))}, which is building the native CPU kernels "
                     f"(lock {lock}); still waiting")
            time.sleep(0.25)
        _clear_stale_lock(lock, _read_owner(fd))
        token = uuid.uuid4().hex
        _write_owner(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.time(), "token": token})
        previous = os.environ.get(BUILDER_ENV)
        os.environ[BUILDER_ENV] = token  # inherited by ninja and the compilers
        try:
            yield
        finally:  # success or a clean error (torch removed its lock): not a dead builder
            if previous is None:
                os.environ.pop(BUILDER_ENV, None)
            else:
                os.environ[BUILDER_ENV] = previous
            _write_owner(fd, None)
    finally:
        os.close(fd)  # releases the flock


def _jit_build(verbose: bool):
    from torch.utils.cpp_extension import _get_build_directory, load

    src = _source_dir()
    build_dir = Path(_get_build_directory(JIT_NAME, verbose))
    with _build_guard(build_dir):
        _log.info("dqo_kernels: building the native CPU kernels in %s (first use only)",
                  build_dir)
        return load(  # loads the library too, and returns its path
            name=JIT_NAME,
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=[*CFLAGS, *isa_flags(),
                          f"-DDQO_SOURCES_DIGEST={_sources_digest(src)}"],
            extra_include_paths=[str(src)],
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
            is_python_module=False,  # a library of dispatcher ops, loaded by torch
        )


def _load_library(path: str) -> str:
    import torch

    torch.ops.load_library(path)  # registers torch.ops.dqo_kernels.*
    return path


def load_extension(verbose: bool = False):
    """The native ops, ``torch.ops.dqo_kernels``: from the library prebuilt at install, or
    compiled now (first use only); raises if neither is possible."""
    global _ext, _error, _library_path
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise _error
        try:
            path = _load_prebuilt() or _jit_build(verbose)
        except Exception as exc:  # no compiler, no headers, ...
            _error = exc
            raise
        import torch

        _ext, _library_path = torch.ops.dqo_kernels, path
        return _ext


def library_path() -> Optional[str]:
    """The file the native ops were loaded from, once :func:`load_extension` succeeded."""
    return _library_path


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
