"""Seeds and RNG states: every stage of a run draws the same numbers whether or not the process
ran the stages before it (a run resumed after a kill, say)."""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Dict, Iterator

import torch


def stage_seed(seed: int, stage: str) -> int:
    """A seed for ``stage`` of a run with ``seed``: independent of what ran before."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:8], "little") >> 1


def seed_stage(seed: int, stage: str) -> None:
    """Seed torch (CPU and every CUDA device) and ``random`` for ``stage``."""
    s = stage_seed(seed, stage)
    torch.manual_seed(s)
    random.seed(s)


def rng_state() -> Dict:
    """The RNG states a checkpoint keeps: torch's CPU generator, the current CUDA device's (one
    process a GPU: the same state on every rank, so a resume on another number of GPUs
    restores it too), and ``random``'s."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def stage_rng(seed: int, stage: str) -> Iterator[None]:
    """Run a side stage (an evaluation inside training) on its own seed, then put the caller's
    RNG state back, so that the side stage changes nothing that follows it."""
    saved = rng_state()
    seed_stage(seed, stage)
    try:
        yield
    finally:
        set_rng_state(saved)
