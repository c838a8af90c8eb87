"""A run directory (``--out``) owned by one run at a time.

:func:`claim` is what a run does before any work:

- it locks ``<out>/.lock`` (``fcntl.flock``, holding ``pid host``): a second process on the
  same ``--out`` gets a one-line error naming the holder, never an interleaved
  ``metrics.jsonl``. The kernel releases the lock of a process that dies, so a killed run's
  lock is taken over by the next one (the log says so). Under a multi-process launcher only
  rank 0 locks and checks; the other ranks follow it.
- a new run into a directory that holds another run (its ``run.json``, checkpoints, metrics or
  ``final/``) is refused unless ``--overwrite`` (which removes them first) or ``--resume``;
- ``--resume`` compares the options with the run's recorded ones (the latest checkpoint's, else
  ``<out>/config.yaml``): one that changes what the run trains is refused with a one-line diff
  unless ``--resume-force``; a directory with no trace of a run is an error (a mistyped
  ``--out`` would otherwise train from step 0 in silence);
- the run gets an id (``<out>/run.json``, and each checkpoint's ``trainer_state.json``), kept
  across resumes: checkpoint rotation deletes only its own checkpoints.

``claim`` is re-entrant within a process: the command line claims ``--out`` first, and the
library functions it calls (:func:`dqo.runs.run_default`, :func:`dqo.loop.train`) find it
held and take it as it is.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .atomic import atomic_write
from .checkpoint import latest_checkpoint
from .errors import CheckpointError, UsageError
from .options import flag, to_dict

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

log = logging.getLogger("dqo.train")

LOCK_FILE = ".lock"
RECORD_FILE = "run.json"  # the run's id and thread count
# what only a run writes: a directory holding one of these holds a run
RUN_OUTPUTS = (RECORD_FILE, "checkpoints", "metrics.jsonl", "final")
# what --overwrite removes (the reference log-prob cache is keyed by its inputs: kept)
OVERWRITTEN = (*RUN_OUTPUTS, "curves.png", "tensorboard")
# options a --resume may change: none of them changes what the run trains, or in which order
RESUME_MAY_CHANGE = frozenset({
    "out", "resume", "resume_force", "overwrite", "eval_every", "eval_samples", "save_every",
    "keep_checkpoints", "report_to", "max_skipped_steps", "threads", "adapt_threads",
    "progress", "dry_run", "gpu_memory"})


@dataclass
class RunDir:
    """A claimed run directory: ``run_id``; ``threads``, the thread count the run recorded
    (None for a new run)."""

    path: Path
    run_id: str
    threads: Optional[int] = None
    lock_fd: Optional[int] = None

    def record(self, **fields) -> None:
        """Add ``fields`` to ``run.json`` (rank 0 writes)."""
        if fields.get("threads") is not None:
            self.threads = fields["threads"]
        if self.lock_fd is None and launcher_rank() != 0:
            return
        atomic_write(self.path / RECORD_FILE, lambda f: f.write(json.dumps(
            {"run_id": self.run_id, "threads": self.threads})))

    def release(self) -> None:
        if self.lock_fd is not None:
            os.ftruncate(self.lock_fd, 0)  # a lock file left with a pid: its holder died
            os.close(self.lock_fd)  # closing releases the flock
            self.lock_fd = None


_HELD: Dict[str, RunDir] = {}
_NOTHING_TO_RESUME = ("--resume: {out} holds no checkpoint and no run to resume (a mistyped "
                      "--out?); leave --resume out to start one there")


def launcher_rank() -> int:
    """This process's rank, also before the process group exists (the launchers' RANK)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def check_out(out: str) -> None:
    """``--out`` is a directory, or nothing yet."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out: expected a run directory, got the file {out}")


def _lock(out: Path) -> Optional[int]:
    if fcntl is None:
        return None
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.pread(fd, 256, 0)) or "a process that is starting"
        os.close(fd)
        raise UsageError(f"--out {out}: in use by another run ({holder}); wait for it to end, "
                         f"or choose another --out") from None
    previous = _holder(os.pread(fd, 256, 0))
    if previous:
        log.warning("%s: took over the lock of %s, which ended without releasing it (killed?)",
                    out, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _holder(raw: bytes) -> str:
    """``pid 123 on host h`` from the lock file's ``123 h``; '' if empty."""
    parts = raw.decode(errors="replace").split()
    return f"pid {parts[0]} on host {parts[1]}" if len(parts) >= 2 else ""


def _read_json(path: Path) -> Dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise CheckpointError(f"{path}: not valid JSON; remove it, or start over with "
                              f"--overwrite") from None
    return data if isinstance(data, dict) else {}


def changed_options(saved: Dict, now: Dict, source: str = "checkpoint") -> List[str]:
    """``--lr: checkpoint 5e-07, now 2.5e-05`` for each option that changes what the run
    trains and differs (an option ``saved`` lacks, from an older version, is not compared)."""
    return [f"{flag(k)}: {source} {saved[k]}, now {v}" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and k in saved and not _same(saved[k], v)]


def _same(saved, now) -> bool:
    if isinstance(saved, str) and isinstance(now, float):  # YAML 1.1 reads 1e-5 as a string
        try:
            return float(saved) == now
        except ValueError:
            return False
    return saved == now


def _check_resume(out: Path, args, ckpt: Optional[Path], state: Dict) -> None:
    if state.get("args"):
        saved, source = state["args"], "checkpoint"
    elif (out / "config.yaml").is_file():
        import yaml
        saved, source = yaml.safe_load((out / "config.yaml").read_text()) or {}, "config.yaml"
    else:
        if ckpt is None and not (out / RECORD_FILE).is_file():
            raise CheckpointError(_NOTHING_TO_RESUME.format(out=out))
        return
    diffs = changed_options(saved, to_dict(args), source)
    if diffs and not getattr(args, "resume_force", False):
        raise UsageError(f"--resume: options differ from the run's ({'; '.join(diffs)}); they "
                         f"change what it trains: resume with the run's values, start a new "
                         f"run in another --out, or give --resume-force")
    for d in diffs:
        log.warning("--resume-force: %s (the optimizer's saved state keeps the checkpoint's "
                    "learning rates)", d)


def _clear(out: Path) -> None:
    found = [n for n in OVERWRITTEN if (out / n).exists()]
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(found), out)


def _open(args, check: bool) -> RunDir:
    check_out(args.out)
    out = Path(args.out).expanduser()
    if args.resume and check and not out.is_dir():
        raise CheckpointError(_NOTHING_TO_RESUME.format(out=out))
    out.mkdir(parents=True, exist_ok=True)
    rank0 = launcher_rank() == 0
    fd = _lock(out) if rank0 else None
    try:
        record = _read_json(out / RECORD_FILE)
        if args.resume:
            ckpt = latest_checkpoint(out)
            state = _read_json(ckpt / "trainer_state.json") if ckpt is not None else {}
            if check and rank0:
                _check_resume(out, args, ckpt, state)
            run = RunDir(out, state.get("run_id") or record.get("run_id") or uuid.uuid4().hex[:12],
                         threads=state.get("threads") or record.get("threads"), lock_fd=fd)
        else:
            found = [n for n in RUN_OUTPUTS if (out / n).exists()]
            if check and rank0 and found:
                if not getattr(args, "overwrite", False):
                    held = f" (run {record['run_id']})" if record.get("run_id") else ""
                    raise UsageError(f"--out {out} holds another run{held}: {', '.join(found)}; "
                                     f"--resume continues it, --overwrite replaces it, or "
                                     f"choose another --out")
                _clear(out)
            run = RunDir(out, uuid.uuid4().hex[:12], lock_fd=fd)
        if rank0:
            run.record()
        return run
    except BaseException:
        RunDir(out, "", lock_fd=fd).release()  # a refused run leaves the lock as it found it
        raise


@contextlib.contextmanager
def claim(args, *, check: bool = True) -> Iterator[RunDir]:
    """Own ``args.out`` for the block (see the module's docstring); ``check=False`` (the
    training loop used as a library): the lock and the run id only, no refusal of a new run
    into a used directory, no comparison of the options on ``--resume``. Re-entrant: a
    directory this process already holds is yielded as it is."""
    key = os.path.realpath(Path(args.out).expanduser())
    held = _HELD.get(key)
    if held is not None:
        yield held
        return
    run = _open(args, check)
    _HELD[key] = run
    try:
        yield run
    finally:
        del _HELD[key]
        run.release()
