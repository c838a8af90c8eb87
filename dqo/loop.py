"""The training loop: one algorithm (:mod:`dqo.algos`) on tokenized examples, with its engines,
checkpoints, metrics and evaluations. ``python -m dqo.train`` runs it (:mod:`dqo.runs`).

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

from . import algos, lora
from .atomic import atomic_write, replace_dir
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .configs import TrainConfig
from .critic import ExplainedVarianceWatch
from .data import Example
from .decoding import DecodingConfig
from .engine import OptimConfig, barrier, make_engine, rank, resolve_engine_kind, world_size
from .errors import TrainingError
from .manifest import write_manifest
from .modeling import PolicyLogprobs, check_packing
from .options import to_dict
from .rng import seed_stage, stage_rng
from .rundir import RunDir, claim
from .threads import adapt as adapt_threads
from .threads import run_threads
from .tracking import Tracker, make_tracker

log = logging.getLogger("dqo.train")  # the trainer's log lines, as python -m dqo.train prints them


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


def padded_share(batches) -> float:
    """Of the positions the models compute this step, the share that is padding."""
    real = sum(int(b.attention_mask.sum()) for b in batches)
    slots = sum(b.attention_mask.numel() for b in batches)
    return 1.0 - real / max(slots, 1)


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


def step_shape(engines, batches) -> Dict[str, float]:
    """This rank's mean response length (action tokens a row) and each engine's gradient norm
    before clipping (``policy_grad_norm``, ``value_grad_norm``): what the curves show."""
    rows = sum(len(b.action_mask) for b in batches)
    out = {"response_length": float(sum(b.action_mask.sum() for b in batches)) / max(1, rows)}
    out.update({f"{name}_grad_norm": getattr(e, "last_grad_norm", float("nan"))
                for name, e in engines.items()})
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


def _is_step(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step") == step
    except (ValueError, AttributeError):  # a cut line: trim_metrics reports it
        return False


def record_start_evaluation(out_dir: Path, res: Dict) -> None:
    """The evaluation before training as ``metrics.jsonl``'s step-0 row (``eval_*`` keys, as
    ``--eval-every`` logs them), replacing the one an earlier start wrote: the first point of
    the accuracy curve. Rank 0 writes; nothing for an empty ``res``."""
    path = Path(out_dir) / "metrics.jsonl"
    if rank() != 0 or not res:
        return
    lines = path.read_text().splitlines() if path.exists() else []
    rest = [x for x in lines if x.strip() and not _is_step(x, 0)]
    head = json.dumps({"step": 0, **{f"eval_{k}": v for k, v in res.items()
                                     if isinstance(v, (int, float))}})
    atomic_write(path, lambda f: f.write("\n".join([head] + rest) + "\n"))


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


def save_final(out_dir: Path, engines, tokenizer, decoding: Optional[DecodingConfig],
               merged: bool = False) -> None:
    """``final/{policy,value}`` in HF format (+ the tokenizer and decoding config beside the
    policy), written to a temporary directory and moved into place: never half written.
    With ``merged`` (a LoRA policy) also ``final/policy-merged`` (:func:`lora.save_merged`).
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
        if merged:
            lora.save_merged(tmp / "policy", tmp / "policy-merged")
        for name in [*engines, *(["policy-merged"] if merged else [])]:
            write_manifest(tmp / name)  # each model directory checkable on its own
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
    (default: ``--report-to``'s, closed at the end). Returns the last evaluation (if any).
    ``args.out`` is locked for the call (:func:`dqo.rundir.claim`; already held when the
    command line claimed it), and checkpoints carry the run's id and thread count."""
    with claim(args, check=False) as run:
        return _train(args, run, tokenizer, policy, value, examples, eval_fn, decoding, tracker)


def _train(args: TrainConfig, run: RunDir, tokenizer, policy, value, examples: List[Example],
           eval_fn: Optional[Callable[[], Dict]], decoding: Optional[DecodingConfig],
           tracker: Optional[Tracker]) -> Dict:
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
    if value is not None:
        value.packing = args.packing
    policy_module = PolicyLogprobs(policy, deepspeed=kind == "deepspeed", packing=args.packing)
    ds = args.deepspeed_options()
    engines = {"policy": make_engine(policy_module, OptimConfig(lr=args.lr, **common), kind,
                                     **ds)}
    if algo.needs_value:
        engines["value"] = make_engine(value, OptimConfig(lr=args.value_learning_rate, **common),
                                       kind, **ds)
    policy_engine = engines["policy"]
    assert world == world_size(), (world, world_size())
    if kind == "torch":
        log.info("engines: plain PyTorch (DeepSpeed is used on GPU or with --engine deepspeed)")
    else:
        log.info("engines: DeepSpeed ZeRO-%d", args.zero_stage)
    device = next(policy_engine.module.parameters()).device

    start = 0
    if args.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        state = load_checkpoint(ckpt, engines)
        start = state["step"]
        log.info("resumed from %s at step %d", ckpt, start)
        if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            log.warning("the run used %d CPU threads until this checkpoint, this process %d: "
                        "sums round differently than in an uninterrupted run",
                        state["threads"], torch.get_num_threads())
    else:
        seed_stage(args.seed, "train")
    metrics_path = out_dir / "metrics.jsonl"
    if rank() == 0 and metrics_path.exists():  # the one writer of the metrics file
        trim_metrics(metrics_path, start)
    last_eval: Dict = {}
    skipped_in_a_row = 0
    watch_critic = ExplainedVarianceWatch(total)
    steps = range(start, total)
    if args.progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=args.algo, initial=start, total=total, disable=None)
    for engine in engines.values():
        engine.train()
    if args.packing and start < total:  # once, on the first rows it will train on
        first = algo.collate([data[j] for j in epoch_order(len(data), args.seed, 0)[:2]],
                             tokenizer.pad_token_id, args.padding).to(device)
        check_packing(policy_module, policy_engine, first.input_ids, first.attention_mask,
                      first.action_mask)
    for step in steps:
        adapt_threads()
        epoch, k = divmod(step, steps_per_epoch)
        lo = k * global_batch + rank() * args.batch_size  # this rank's share of the step
        idx = epoch_order(len(data), args.seed, epoch)[lo:lo + args.batch_size]
        if args.group_by_length:  # the same rows, neighbours in length share micro-batches
            idx = sorted(idx, key=lambda j: algo.length(data[j]))
        batches = [algo.collate([data[j] for j in idx[i:i + args.micro_batch]],
                                tokenizer.pad_token_id, args.padding).to(device)
                   for i in range(0, len(idx), args.micro_batch)]
        num_tokens = step_token_count(batches, grad_accum)
        padded = 0.0 if args.packing else padded_share(batches)
        t0 = time.perf_counter()
        stats = merge_stats([algo.step(engines, b, num_tokens) for b in batches])
        skipped = any(e.last_step_skipped for e in engines.values())
        row = dict(step=step + 1, epoch=epoch, lr=policy_engine.get_lr()[0],
                   step_time=time.perf_counter() - t0, **stats, skipped=skipped,
                   padded_share=padded, **step_shape(engines, batches))
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
        if step == 0 and row.get("is_weight_mean", 1.0) < 0.99:
            log.warning("step 1: mean importance weight %.3f while the policy is still the "
                        "reference (it should be 1): the behaviour log-probs differ from the "
                        "training forward's (sampler noise: bf16, KV cache, padding), or the "
                        "data come from another policy; if --model sampled the data, use "
                        "--behavior-logp reference", row["is_weight_mean"])
        watch_critic(row)
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
            save_checkpoint(out_dir, step + 1, engines,
                            {"args": to_dict(args), "run_id": run.run_id,
                             "threads": run_threads()}, keep=args.keep_checkpoints)
    save_final(out_dir, engines, tokenizer, decoding, merged=args.save_merged)
    if rank() == 0:
        draw_curves(out_dir)
    if own_tracker and tracker is not None:
        tracker.close()
    return last_eval
