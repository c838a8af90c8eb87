"""Atomic file writes (a reader sees the old file or the new one, never a partial one), and
safe reads of saved tensors."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

import torch

from .errors import CheckpointError


def _new_file_mode() -> int:
    """0666 less the process's umask, read without setting it where Linux allows (setting it
    to read it would change it for every thread for a moment)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is all we can do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    The temporary name is unique per call, so several writers of the same path (concurrent
    jobs sharing an output folder, say) never share or delete each other's temporary file; the
    last rename wins. A failed write leaves ``path`` untouched and no temporary file behind.
    The file gets the mode a plain ``open`` would give it (0666 less the umask), not
    ``mkstemp``'s 0600: a dataset or checkpoint written for a team stays readable by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = dict(mode="wb") if binary else dict(mode="w", encoding="utf-8")
        with os.fdopen(fd, **mode) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def replace_dir(src, dst) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing what is there.

    A directory cannot be renamed over a non-empty one, so an existing ``dst`` is first renamed
    aside (``.<name>.old-*``), then ``src`` takes its place, then the old one is deleted. A
    crash between the two renames leaves no ``dst`` but the previous version whole beside it;
    at no moment is ``dst`` a partial directory."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def safe_load(path):
    """``torch.load`` of tensors and plain containers only (``weights_only``): a checkpoint
    file is data, and a pickle in it must never run code. A file that is not is an error that
    names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a pickle; anything else for a damaged file
        raise CheckpointError(f"{path}: not loadable as plain tensors and containers "
                              f"(weights_only=True): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
