"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<out>/checkpoints/step-NNNNNNN/`` with one sub-directory per
engine and ``trainer_state.json``. It is written under a temporary name and renamed into place
(``os.replace`` is atomic on POSIX), then ``latest`` is replaced the same way, so a run killed
at any moment leaves the previous checkpoint intact and ``--resume`` never sees a partial one.
A save that fails (a full disk) raises, removes its temporary directory and leaves ``latest``
and the previous checkpoints as they were. RNG states (torch CPU and CUDA, ``random``) are
saved with each checkpoint and restored with it. Rotation (``keep``) deletes only the saving
run's own older checkpoints (``state["run_id"]``), never another run's nor the one ``latest``
names.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .atomic import atomic_write, safe_load
from .engine import barrier, rank
from .errors import CheckpointError
from .manifest import check_weights, verify_checkpoint, write_manifest
from .rng import rng_state, set_rng_state

RNG_FILE = "rng_state.pt"


def save_checkpoint(out_dir, step: int, engines: Dict[str, object], state: Dict,
                    keep: int = 2) -> Path:
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(tmp / name)
        barrier()
        if rank() == 0:
            torch.save(rng_state(), tmp / RNG_FILE)
            atomic_write(tmp / "trainer_state.json",
                         lambda f: f.write(json.dumps(dict(state, step=step))))
            write_manifest(tmp)  # every file's digest, checked by load_checkpoint
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:
        if rank() == 0:  # a full disk, say: nothing half-written stays, latest is untouched
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank() == 0:
        atomic_write(root / "latest", lambda f: f.write(final.name))
        rotate(root, final, state.get("run_id"), keep)
    barrier()
    return final


def _step_of(path: Path) -> Optional[int]:
    try:
        return int(path.name[len("step-"):])
    except ValueError:
        return None


def run_id_of(path) -> Optional[str]:
    """The id of the run that wrote the checkpoint ``path`` (None: written before runs had
    ids, or unreadable)."""
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def rotate(root: Path, final: Path, run_id: Optional[str], keep: int) -> None:
    """Delete run ``run_id``'s checkpoints older than its ``keep`` most recent, ``final`` (the
    one just saved, which ``latest`` names) counted first. Never touched: another run's
    checkpoints (another id), and this run's of a later step than ``final`` (left by a resume
    from an older checkpoint: not older, and overwritten when the run gets there)."""
    if keep <= 0:
        return
    step = _step_of(final)
    own = sorted((s, p) for p in root.glob("step-*")
                 if p != final and p.is_dir() and (s := _step_of(p)) is not None
                 and s < step and run_id_of(p) == run_id)
    for _, old in own[:max(0, len(own) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None if there is no ``latest`` (a fresh run). A
    ``latest`` that names a missing or incomplete checkpoint is an error: resuming at step 0
    would silently throw the run's progress away."""
    root = Path(out_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{root / 'latest'} names {path}, which is missing or incomplete; "
                              f"remove {root / 'latest'} to start over, or point it at a "
                              f"complete step-* directory of {root}")
    return path


def load_checkpoint(path, engines: Dict[str, object]) -> Dict:
    path = Path(path)
    verify_checkpoint(path)  # a damaged file: an error naming it and the last intact step
    for name, engine in engines.items():
        engine.load_checkpoint(path / name)
        check_weights(engine.module.named_parameters(), path / name)
    state = json.loads((path / "trainer_state.json").read_text())
    if "torch_rng" in state:  # written before RNG_FILE existed
        torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    else:
        set_rng_state(safe_load(path / RNG_FILE))
    return state
