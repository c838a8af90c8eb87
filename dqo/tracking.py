"""Experiment tracking, transformers' convention: ``--report-to none|tensorboard|wandb``.

Every row of ``metrics.jsonl`` (losses, KL, importance-weight statistics, evaluation results)
goes to the tracker as scalars at its step, from rank 0 only, under grouped tags as TRL's
trainers write them: ``train/loss``, ``train/kl``, ...; ``eval/greedy`` for the evaluations
(``eval/before_greedy``, ``eval/after_greedy`` for the ones before and after training). The
run's options go with it: TensorBoard's hparams plugin (the HPARAMS tab), W&B's run config.
TensorBoard writes to ``<out>/tensorboard``; W&B logs to its project (``WANDB_PROJECT``, default
``dqo``) in the run directory, offline with ``WANDB_MODE=offline``.
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
        self._log({tag(k): v for k, v in scalars(row).items()}, step)

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


def tag(key: str) -> str:
    """A metrics key as a grouped tag: ``eval/...`` for evaluations, ``train/...`` otherwise."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith(("before_", "after_")):
        return "eval/" + key
    return "train/" + key


def hparams(config: Dict) -> Dict:
    """The run's options as the hparams plugin takes them (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in config.items()}


class TensorBoard(Tracker):
    def __init__(self, out_dir: Path, config: Optional[Dict] = None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if config:  # into this run's own events file (add_hparams would start another run)
            metrics = {t: 0.0 for t in ("eval/greedy", "eval/sampled", "train/loss")}
            for summary in hparams_summary(hparams(config), metrics):
                self.writer.file_writer.add_summary(summary)

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
    """The tracker ``--report-to`` names (None for ``none``); a missing package is a
    UsageError naming the pip extra (:mod:`dqo.optional`)."""
    if kind not in REPORT_TO:
        raise ValueError(f"report_to: expected one of {REPORT_TO}, got {kind!r}")
    if kind == "none":
        return None
    from .optional import require
    require(kind, f"--report-to {kind}")  # torch.utils.tensorboard needs the tensorboard package
    return TensorBoard(out_dir, config) if kind == "tensorboard" else WandB(out_dir, config)
