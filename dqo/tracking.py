"""Experiment tracking, transformers' convention: ``--report-to none|tensorboard|wandb``.

Every row of ``metrics.jsonl`` (losses, KL, importance-weight statistics, evaluation results)
goes to the tracker as scalars at its step, from rank 0 only. TensorBoard writes to
``<out>/tensorboard``; W&B logs to its project (``WANDB_PROJECT``, default ``dqo``) in the run
directory, offline with ``WANDB_MODE=offline``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    last_step = 0  # the last step logged: where the final evaluation goes

    def log(self, row: Dict, step: int) -> None:
        self.last_step = max(self.last_step, step)
        self._log(scalars(row), step)

    def _log(self, values: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def scalars(row: Dict) -> Dict[str, float]:
    """The finite numbers of a metrics row (booleans as 0/1), under their own names."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, str) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class TensorBoard(Tracker):
    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def _log(self, values: Dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, out_dir: Path, config: Dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dqo"), dir=str(out_dir),
                              config=config, name=Path(out_dir).name)

    def _log(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, out_dir, config: Dict) -> Optional[Tracker]:
    """The tracker ``--report-to`` names (None for ``none``); raises ImportError naming the
    package to install."""
    if kind not in REPORT_TO:
        raise ValueError(f"report_to: expected one of {REPORT_TO}, got {kind!r}")
    if kind == "none":
        return None
    try:
        return TensorBoard(out_dir) if kind == "tensorboard" else WandB(out_dir, config)
    except ImportError as exc:
        raise ImportError(f"--report-to {kind} needs the {kind} package "
                          f"(pip install {kind}): {exc}") from exc
