"""Train a policy (and its value model) with DQO on offline data.

    python -m dqo.train                                   # the embedded default, CPU, minutes
    python -m dqo.train --model PATH --data data.jsonl --task gsm8k --eval-data test.jsonl

With no ``--data`` the embedded default runs end to end: a tiny transformer is built from a
config (no download), warmed up with SFT on the synthetic arithmetic task until it is right
sometimes, used to sample an offline dataset, and then trained with DQO; greedy and sampled
accuracy on held-out problems are printed before and after.

The library is :mod:`dqo.runs` (the two runs) and :mod:`dqo.loop` (the training loop); this
module is their command line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Dict

from .cli import check_data, check_model, configure_logging, parse_config, write_config
from .cli import run as run_cli
from .configs import EMBEDDED_DEFAULT, TRAIN_SECTIONS, TrainConfig
from .decoding import sidecar
from .engine import leave_process_group, rank, resolve_engine_kind
from .errors import RewardError, UsageError
from .optional import check_installed
from .options import flag
from .rewards import load_reward
from .rundir import check_out, claim
from .runs import run_custom, run_default
from .threads import fit_threads

log = logging.getLogger("dqo.train")


def embedded_default_preset(given: Dict) -> Dict:
    """The embedded default's values, when no ``--data`` was given."""
    return {} if given.get("data") else dict(EMBEDDED_DEFAULT)


def parse_args(argv=None) -> TrainConfig:
    """The run's config from the command line (and ``--config FILE.yaml``), checked before any
    work; ``main()`` makes a UsageError one line and exit code 2."""
    preset = ", ".join(f"{flag(k)} {v}" for k, v in EMBEDDED_DEFAULT.items())
    args = parse_config(TrainConfig, TRAIN_SECTIONS, argv, prog="python -m dqo.train",
                        description=__doc__, preset=embedded_default_preset,
                        epilog=f"Without --data, the embedded default's preset replaces these "
                               f"defaults: {preset}. Every run writes its resolved options to "
                               f"<out>/config.yaml, which --config reads back.")
    check_command_line(args)
    return args


def check_command_line(a: TrainConfig) -> None:
    """Every path there and the reward function loadable, as the API would find out later:
    after minutes of warm-up or sampling, or with an error message about something else."""
    if a.data is not None and a.model is None:
        raise UsageError("--data needs --model (the base policy the data was sampled from)")
    if a.model is not None and a.data is None:
        raise UsageError("--model needs --data: sample an offline dataset with "
                         "python -m dqo.sample first")
    check_out(a.out)
    check_model("--model", a.model)
    check_model("--value-model", a.value_model)
    check_data("--data", a.data)
    check_data("--eval-data", a.eval_data)
    check_data("--sft-data", a.sft_data)
    check_decoding_record(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and resolve_engine_kind(a.engine) == "torch":  # N copies of one run otherwise
        raise UsageError(f"--engine: a launcher started {world} processes (WORLD_SIZE), and the "
                         f"torch engine trains in one; use --engine deepspeed (docs/scale-out.md)")
    if a.reward_fn:
        try:
            load_reward(a.reward_fn, a.correct_threshold)
        except RewardError as exc:
            raise UsageError(str(exc)) from None


def check_decoding_record(a: TrainConfig) -> None:
    """Evaluating (``--eval-data``) decodes as the data were sampled, read from the decoding
    record ``dqo.sample`` writes beside them (before the rows): without one, every setting the
    evaluation uses must be given, never silently taken from the defaults (a record lost to a
    full disk, data copied without it)."""
    if a.data is None or a.eval_data is None or sidecar(a.data).is_file():
        return
    used = ["max_new_tokens"] + (["temperature", "top_p", "top_k"] if a.eval_samples else [])
    unset = [flag(f) for f in used if getattr(a, f) is None]
    if unset:
        raise UsageError(f"--data: no decoding record {sidecar(a.data)} beside it (dqo.sample "
                         f"writes it), so --eval-data does not know how the data were decoded; "
                         f"put the record beside the data, or give {', '.join(unset)}")


def print_memory_plan(args: TrainConfig) -> None:
    """``--dry-run``: the per-GPU memory plan of this run (:mod:`dqo.memory`), from the model's
    config alone, and nothing else."""
    import os

    import torch

    from .memory import print_plan
    if args.model is None:
        raise UsageError("--dry-run: plans a --model run (the embedded default's model is "
                         "tiny)")
    zero = args.zero_stage if resolve_engine_kind(args.engine) == "deepspeed" else 0
    print_plan(args.model, args,
               gpus=int(os.environ.get("WORLD_SIZE", "0")) or max(1, torch.cuda.device_count()),
               zero_stage=zero, micro_batch=args.micro_batch, seq_len=args.max_length or 1024,
               weight_bytes=2 if torch.cuda.is_available() else 4,
               note="" if args.max_length else " (a planning length: set --max-length)")


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.train",
            interrupted="the checkpoints written so far are intact; --resume continues")


def _main(argv=None) -> None:
    configure_logging()
    for noisy in ("httpx", "transformers", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Writing model shards" at every save
    args = parse_args(argv)
    if args.dry_run:
        print_memory_plan(args)
        return
    check_installed(args)
    t0 = time.time()
    with claim(args) as run:  # before config.yaml is rewritten: --resume compares with it
        if rank() == 0:  # what the run is; not what this command did to the directory
            write_config(dataclasses.replace(args, resume=False, resume_force=False,
                                             overwrite=False), Path(args.out) / "config.yaml")
        if args.data is None:
            log.info("the embedded default: %s", ", ".join(f"{k}={getattr(args, k)}"
                                                            for k in EMBEDDED_DEFAULT))
        run.record(threads=fit_threads(args.threads, recorded=run.threads if args.resume
                                       else None, adaptive=args.adapt_threads))
        res = run_default(args) if args.data is None else run_custom(args)
        leave_process_group()
    if res["before"]:
        print("\naccuracy on held-out problems   greedy   sampled")
        for name in ("before", "after"):
            r = res[name]
            print(f"  {name:6s} {args.algo.upper():3s}                  {r['greedy']:6.3f}   "
                  f"{r.get('sampled', float('nan')):6.3f}")
    print(f"done in {time.time() - t0:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
