"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<out>/checkpoints/step-NNNNNNN/`` with one sub-directory per
engine and ``trainer_state.json``. It is written under a temporary name and renamed into place
(``os.replace`` is atomic on POSIX), then ``latest`` is replaced the same way, so a run killed
at any moment leaves the previous checkpoint intact and ``--resume`` never sees a partial one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .atomic import atomic_write
from .engine import barrier, rank


def save_checkpoint(out_dir, step: int, engines: Dict[str, object], state: Dict,
                    keep: int = 2) -> Path:
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(tmp / name)
    barrier()
    if rank() == 0:
        state = dict(state, step=step, torch_rng=torch.get_rng_state().tolist())
        atomic_write(tmp / "trainer_state.json", lambda f: f.write(json.dumps(state)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(root / "latest", lambda f: f.write(final.name))
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(out_dir) -> Optional[Path]:
    root = Path(out_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / "trainer_state.json").is_file() else None


def load_checkpoint(path, engines: Dict[str, object]) -> Dict:
    path = Path(path)
    for name, engine in engines.items():
        engine.load_checkpoint(path / name)
    state = json.loads((path / "trainer_state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state
