"""Train a policy (and its value model) with DQO on offline data.

    python -m dqo.train                                   # the embedded default, CPU, minutes
    python -m dqo.train --model PATH --data data.jsonl --task gsm8k --eval-data test.jsonl

With no ``--data`` the embedded default runs end to end: a tiny transformer is built from a
config (no download), warmed up with SFT on the synthetic arithmetic task until it is right
sometimes, used to sample an offline dataset, and then trained with DQO; greedy and sampled
accuracy on held-out problems are printed before and after.

The recipe, one optimizer step:
  1. a batch of offline responses, split into micro-batches;
  2. the global action-token count of the step (all micro-batches, all ranks), so token-mean
     stays exact under gradient accumulation and data parallelism;
  3. per micro-batch: policy log-probs (lm_head fused, no [B, T, V] logits), values,
     ``fused_dqo_loss``; each engine back-propagates its own loss;
  4. metrics to ``metrics.jsonl``; periodic evaluation; atomic checkpoints (``--resume``).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import algos
from .atomic import atomic_write, replace_dir
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .cli import check_data, check_model, parse_config, write_config
from .cli import run as run_cli
from .configs import EMBEDDED_DEFAULT, TRAIN_SECTIONS, TrainConfig
from .data import (
    Example,
    apply_truncated_policy,
    read_jsonl,
    read_solutions,
    sft_rows,
    tokenize_rows,
)
from .decoding import DecodingConfig, find_decoding, sidecar
from .engine import (
    OptimConfig,
    barrier,
    join_launcher_group,
    leave_process_group,
    make_engine,
    rank,
    resolve_engine_kind,
    world_size,
)
from .errors import RewardError, TrainingError, UsageError
from .modeling import PolicyLogprobs, ValueModel
from .options import flag, to_dict
from .pipeline import DefaultPipeline, Evaluator, Splits, sample_offline, warm_up_base
from .reference_logps import compute_ref_logps
from .rewards import load_reward, task_reward
from .rng import seed_stage, stage_rng
from .threads import adapt as adapt_threads
from .threads import fit_threads
from .tracking import Tracker, make_tracker

log = logging.getLogger("dqo.train")


# the options of a run: dqo.configs.TrainConfig (declared once, checked when built)


@functools.lru_cache(maxsize=1)  # every step of an epoch reads the same order
def epoch_order(n: int, seed: int, epoch: int) -> Tuple[int, ...]:
    """The data order of one epoch; runs with different seeds share no epoch's order."""
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return tuple(order)


def step_token_count(batches, grad_accum: int) -> torch.Tensor:
    """``num_tokens`` for fused_dqo_loss: the step's action tokens over every micro-batch and
    rank, divided by what the engines divide gradients by (ranks x accumulation steps)."""
    n = sum(b.action_mask.sum() for b in batches).float()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
    return n / (world_size() * grad_accum)


def merge_stats(parts: List[Dict]) -> Dict:
    """Token-weighted means of micro-batch statistics; losses add up; maxima stay maxima."""
    n = sum(p["num_tokens"] for p in parts) or 1.0
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):  # a skipped part has fewer keys
        vals = [p.get(k, float("nan")) for p in parts]
        if k in ("loss", "policy_loss", "value_loss", "num_tokens"):
            out[k] = sum(vals)
        elif k == "td_abs_max":
            out[k] = max((v for v in vals if math.isfinite(v)), default=float("nan"))
        else:
            finite = [(v, p["num_tokens"]) for v, p in zip(vals, parts) if math.isfinite(v)]
            out[k] = sum(v * w for v, w in finite) / n if finite else float("nan")
    return out


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the later ones are redone). A cut
    last line, left by a process killed mid-write, is dropped with a warning."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropped a cut last line (a process killed mid-write)", path)
                continue
            raise TrainingError(f"{path}:{i + 1}: not a JSON row; the metrics file is damaged "
                                f"before its last line") from None
        if row["step"] <= step:
            kept.append(line)
    atomic_write(path, lambda f: f.writelines(line + "\n" for line in kept))


def report_final(tracker: Optional[Tracker], res: Dict) -> None:
    """The evaluations before and after training, to the tracker (then closed)."""
    if tracker is None:
        return
    tracker.log({f"before_{k}": v for k, v in res.get("before", {}).items()}, 0)
    tracker.log({f"after_{k}": v for k, v in res.get("after", {}).items()}, tracker.last_step)
    tracker.close()


def draw_curves(out_dir: Path) -> None:
    """``curves.png`` from ``metrics.jsonl`` (dqo.plot); a run without matplotlib skips it."""
    try:
        from .plot import plot_run
        log.info("training curves: %s", plot_run(out_dir))
    except ImportError:
        log.info("no training curves: matplotlib is not installed (pip install matplotlib)")
    except ValueError as exc:  # no metrics rows (a resumed run that was already complete)
        log.info("no training curves: %s", exc)


def save_final(out_dir: Path, engines, tokenizer, decoding: Optional[DecodingConfig]) -> None:
    """``final/{policy,value}`` in HF format (+ the tokenizer and decoding config beside the
    policy), written to a temporary directory and moved into place: never half written.
    Collective under ZeRO-3 (every rank calls it; rank 0 writes)."""
    final, tmp = out_dir / "final", out_dir / ".final.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for name, engine in engines.items():
        engine.save_pretrained(tmp / name)
    if rank() == 0:
        tokenizer.save_pretrained(tmp / "policy")
        if decoding is not None:
            decoding.save(tmp / "policy" / "decoding.json")
        replace_dir(tmp, final)
    barrier()


def open_tracker(args: TrainConfig, out_dir: Path) -> Optional[Tracker]:
    """``--report-to``'s tracker on rank 0 (None elsewhere, and for ``none``)."""
    return make_tracker(args.report_to, out_dir, to_dict(args)) if rank() == 0 else None


def train(args: TrainConfig, tokenizer, policy, value, examples: List[Example],
          eval_fn: Optional[Callable[[], Dict]] = None,
          decoding: Optional[DecodingConfig] = None,
          tracker: Optional[Tracker] = None) -> Dict:
    """The training loop of ``args.algo`` (see :mod:`dqo.algos`). ``examples`` carry
    ``ref_logp`` where the algorithm needs it; ``value`` is None for policy-only algorithms;
    ``decoding`` is saved with the final policy; every metrics row also goes to ``tracker``
    (default: ``--report-to``'s, closed at the end). Returns the last evaluation (if any)."""
    own_tracker = tracker is None
    if own_tracker:
        tracker = open_tracker(args, Path(args.out))
    algo = algos.make(args.algo, args)
    data = algo.items(examples, seed=args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    algo.setup(data, policy, tokenizer.pad_token_id, cache_dir=str(out_dir / "cache"))
    grad_accum = args.batch_size // args.micro_batch
    # batch_size is per rank; one optimizer step consumes batch_size x world examples.
    kind = resolve_engine_kind(args.engine)
    world = int(os.environ.get("WORLD_SIZE", "1")) if kind == "deepspeed" else 1
    global_batch = args.batch_size * world
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{args.algo}: {len(data)} training items are fewer than one global "
                         f"batch of {global_batch}")
    total = args.max_steps or args.epochs * steps_per_epoch
    common = dict(weight_decay=0.0, grad_clip=args.grad_clip, warmup_steps=args.warmup_steps,
                  total_steps=total, grad_accum=grad_accum, micro_batch=args.micro_batch)
    engines = {"policy": make_engine(PolicyLogprobs(policy, deepspeed=kind == "deepspeed"),
                                     OptimConfig(lr=args.lr, **common), kind, args.zero_stage)}
    if algo.needs_value:
        engines["value"] = make_engine(value, OptimConfig(lr=args.value_lr or args.lr, **common),
                                       kind, args.zero_stage)
    policy_engine = engines["policy"]
    assert world == world_size(), (world, world_size())
    if kind == "torch":
        log.info("engines: plain PyTorch (DeepSpeed is used on GPU or with --engine deepspeed)")
    else:
        log.info("engines: DeepSpeed ZeRO-%d", args.zero_stage)
    device = next(policy_engine.module.parameters()).device

    start = 0
    if args.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        start = load_checkpoint(ckpt, engines)["step"]
        log.info("resumed from %s at step %d", ckpt, start)
    else:
        seed_stage(args.seed, "train")
    metrics_path = out_dir / "metrics.jsonl"
    if rank() == 0 and metrics_path.exists():  # the one writer of the metrics file
        trim_metrics(metrics_path, start)
    last_eval: Dict = {}
    skipped_in_a_row = 0
    steps = range(start, total)
    if args.progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=args.algo, initial=start, total=total, disable=None)
    for engine in engines.values():
        engine.train()
    for step in steps:
        adapt_threads()
        epoch, k = divmod(step, steps_per_epoch)
        lo = k * global_batch + rank() * args.batch_size  # this rank's share of the step
        idx = epoch_order(len(data), args.seed, epoch)[lo:lo + args.batch_size]
        batches = [algo.collate([data[j] for j in idx[i:i + args.micro_batch]],
                                tokenizer.pad_token_id, args.padding).to(device)
                   for i in range(0, len(idx), args.micro_batch)]
        num_tokens = step_token_count(batches, grad_accum)
        t0 = time.perf_counter()
        stats = merge_stats([algo.step(engines, b, num_tokens) for b in batches])
        skipped = any(e.last_step_skipped for e in engines.values())
        row = dict(step=step + 1, epoch=epoch, lr=policy_engine.get_lr()[0],
                   step_time=time.perf_counter() - t0, **stats, skipped=skipped)
        if eval_fn is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            with stage_rng(args.seed, f"evaluate-step-{step + 1}"):  # training's RNG untouched
                last_eval = eval_fn()
            row.update({f"eval_{k}": v for k, v in last_eval.items()})
            policy_engine.train()
        if rank() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tracker is not None:
                tracker.log(row, step + 1)
        if args.progress:
            steps.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "kl", "return_mean")
                               if k in row})
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped:
            log.warning("step %d: the gradient is not finite (loss %s); the update was skipped "
                        "(%d in a row)", step + 1, row.get("loss"), skipped_in_a_row)
            if skipped_in_a_row >= args.max_skipped_steps:
                last = latest_checkpoint(out_dir)
                raise TrainingError(
                    f"{skipped_in_a_row} consecutive steps (up to step {step + 1}) had "
                    f"non-finite gradients (last loss {row.get('loss')}); stopped. The weights "
                    f"took none of them; the last checkpoint is "
                    f"{last if last is not None else 'none (--save-every 0)'}. Lower --lr, or "
                    f"check the data; --max-skipped-steps allows more")
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == total):
            save_checkpoint(out_dir, step + 1, engines, {"args": to_dict(args)},
                            keep=args.keep_checkpoints)
    save_final(out_dir, engines, tokenizer, decoding)
    if rank() == 0:
        draw_curves(out_dir)
    if own_tracker and tracker is not None:
        tracker.close()
    return last_eval


# ---------------------------------------------------------------------------------------------
# The embedded default: tiny model, synthetic task, SFT warm-up, sampling, DQO.


def run_default(args: TrainConfig, pipe: Optional[DefaultPipeline] = None) -> Dict:
    pipe = pipe or DefaultPipeline()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = Splits(pipe, args.seed)
    log.info("stage 1/4: a tiny base policy, warmed up with SFT on the arithmetic task")
    tok, policy = warm_up_base(pipe, splits, out_dir, seed=args.seed, reuse=args.resume,
                               progress=args.progress)
    decoding = pipe.decoding.with_stop_ids(tok, policy)
    evaluate = Evaluator(tok, splits.test, decoding, samples=args.eval_samples)
    seed_stage(args.seed, "evaluate-before")  # every stage: the same draws after a --resume
    before = evaluate(policy)
    log.info("base policy: greedy %.3f, sampled %.3f", before["greedy"], before["sampled"])

    log.info("stage 2/4: sampling %d responses for each of %d prompts",
             pipe.samples_per_prompt, pipe.n_offline)
    seed_stage(args.seed, "sample")
    rows = sample_offline(policy, tok, pipe, splits.offline, out_dir / "offline.jsonl",
                          reuse=args.resume, progress=args.progress)
    log.info("offline data: %d responses, %.1f%% correct", len(rows),
             100 * sum(r["reward"] > 0 for r in rows) / len(rows))

    log.info("stage 3/4: reference log-probs and %s training", args.algo.upper())
    examples, _ = tokenize_rows(rows, tok, strict=True, stop_ids=decoding.stop_ids)
    examples = truncated_examples(args, examples)
    compute_ref_logps(policy, examples, tok.pad_token_id, cache_dir=str(out_dir / "cache"))
    value = ValueModel.from_policy(policy) if algos.REGISTRY[args.algo].needs_value else None
    tracker = open_tracker(args, out_dir)
    train(args, tok, policy, value, examples, eval_fn=lambda: evaluate(policy, samples=0),
          decoding=decoding, tracker=tracker)

    log.info("stage 4/4: evaluation")
    seed_stage(args.seed, "evaluate-after")
    res = {"before": before, "after": evaluate(policy)}
    report_final(tracker, res)
    return res


def check_bad_rows(args: TrainConfig, errors: List[str], total: int) -> None:
    """Stop if more than ``--max-bad-rows`` of the data was skipped: a run that trains on what
    is left of a mostly broken file should not look like a success."""
    if errors and len(errors) > args.max_bad_rows * total:
        raise UsageError(f"{len(errors)} of {total} rows of {args.data} are bad and were skipped, "
                         f"more than --max-bad-rows {args.max_bad_rows:g} allows (the first: "
                         f"{errors[0]}); fix the data, or raise --max-bad-rows")
    if errors:
        log.warning("%d of %d rows skipped (see above); training on the %d left", len(errors),
                    total, total - len(errors))


def truncated_examples(args: TrainConfig, examples: List[Example]) -> List[Example]:
    """``--truncated`` applied to the unfinished responses, with one summary line."""
    kept, counts = apply_truncated_policy(examples, args.truncated, args.truncated_reward)
    if counts["unfinished"]:
        log.info("data: %d of %d responses unfinished (%d of them cut to fit --max-length): "
                 "%s", counts["unfinished"], counts["examples"], counts["cut_to_fit"],
                 {"bootstrap": "their returns bootstrap from V",
                  "drop": f"dropped, {len(kept)} left",
                  "penalize": f"terminal with reward {args.truncated_reward:+g}"}[args.truncated])
    return kept


def run_custom(args: TrainConfig) -> Dict:
    """``--model PATH --data FILE``: train a real model on an offline dataset."""
    from .evaluation import accuracy
    from .modeling import load_policy

    if torch.cuda.is_available():  # one GPU per process under the deepspeed/torchrun launchers
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    join_launcher_group(args.engine)
    tok, policy = load_policy(args.model)
    dtype = next(policy.parameters()).dtype
    # the data's own decoding settings (dqo.sample writes them beside it): its stop tokens
    # decide which rows finished, its length limit is the evaluation's
    decoding = find_decoding(sidecar(args.data))
    if decoding is None:
        log.info("no %s beside the data: stop tokens from the tokenizer and model, the paper's "
                 "sampling settings for evaluation", sidecar(args.data))
        decoding = DecodingConfig()
    decoding = args.decoding_config(decoding).with_stop_ids(tok, policy)
    rows, bad = read_jsonl(args.data, strict=args.strict_data)
    if args.algo == "sft":  # canonical solutions, never the sampled responses
        if args.sft_data:
            rows, bad = read_solutions(args.sft_data), []
        rows = sft_rows(rows, args.sft_data or args.data)
    # the model's context is the length limit unless the user sets one: a huge row is cut to
    # fit (and trained as unfinished), never allowed to exhaust memory
    max_length = args.max_length or getattr(policy.config, "max_position_embeddings", None)
    examples, bad_tokens = tokenize_rows(rows, tok, max_length=max_length,
                                         strict=args.strict_data, stop_ids=decoding.stop_ids)
    check_bad_rows(args, bad + bad_tokens, len(rows) + len(bad))
    examples = truncated_examples(args, examples)
    if algos.REGISTRY[args.algo].needs_ref:
        compute_ref_logps(policy, examples, tok.pad_token_id,
                          cache_dir=str(Path(args.out) / "cache"))
    value = None
    if algos.REGISTRY[args.algo].needs_value:
        value = (ValueModel.from_pretrained(args.value_model, dtype=dtype) if args.value_model
                 else ValueModel.from_policy(policy))
        value.to(next(policy.parameters()).device)
    eval_fn = None
    if args.eval_data:
        from .data import extra_columns, read_prompt_rows
        rows = read_prompt_rows(args.eval_data, require_answer=args.reward_fn is None,
                                prompt_column=args.prompt_column,
                                answer_column=args.answer_column)
        reward = (load_reward(args.reward_fn, args.correct_threshold) if args.reward_fn
                  else task_reward(args.task or "arithmetic", args.correct_threshold))
        eval_fn = lambda: accuracy(  # noqa: E731
            policy, tok, [r["prompt"] for r in rows], [r.get("answer") for r in rows], reward,
            samples=args.eval_samples, decoding=decoding,
            columns=[extra_columns(r) for r in rows])
    seed_stage(args.seed, "evaluate-before")
    before = eval_fn() if eval_fn else {}
    tracker = open_tracker(args, Path(args.out))
    train(args, tok, policy, value, examples, eval_fn=eval_fn, decoding=decoding,
          tracker=tracker)
    seed_stage(args.seed, "evaluate-after")
    after = eval_fn() if eval_fn else {}
    res = {"before": before, "after": after}
    report_final(tracker, res)
    return res


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
    check_model("--model", a.model)
    check_model("--value-model", a.value_model)
    check_data("--data", a.data)
    check_data("--eval-data", a.eval_data)
    check_data("--sft-data", a.sft_data)
    if a.reward_fn:
        try:
            load_reward(a.reward_fn, a.correct_threshold)
        except RewardError as exc:
            raise UsageError(str(exc)) from None


def main(argv=None) -> None:
    run_cli(_main, argv, prog="python -m dqo.train")


def _main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Writing model shards" at every save
    args = parse_args(argv)
    if rank() == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_config(args, Path(args.out) / "config.yaml")
    if args.data is None:
        log.info("the embedded default: %s", ", ".join(f"{k}={getattr(args, k)}"
                                                        for k in EMBEDDED_DEFAULT))
    fit_threads(args.threads)
    t0 = time.time()
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
