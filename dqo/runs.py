"""The two runs of ``python -m dqo.train``: the embedded default (a tiny model on the synthetic
task: SFT warm-up, sampling, training, evaluation; :mod:`dqo.pipeline` holds its stages) and a
custom run (``--model PATH --data FILE``: a real model on an offline dataset). Each reads,
tokenizes and prepares the data, then calls the loop (:func:`dqo.loop.train`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import algos, lora
from .configs import TrainConfig
from .critic import init_value_head, mean_return
from .data import (
    Example,
    apply_truncated_policy,
    extra_columns,
    read_jsonl,
    read_prompt_rows,
    read_solutions,
    sft_rows,
    tokenize_rows,
)
from .decoding import DecodingConfig, find_decoding, model_id, sidecar
from .engine import join_launcher_group, resolve_engine_kind
from .errors import UsageError
from .evaluation import accuracy
from .loop import open_tracker, record_start_evaluation, report_final, train
from .modeling import SharedValueModel, ValueModel, enable_checkpointing, load_policy
from .pipeline import DefaultPipeline, Evaluator, Splits, sample_offline, warm_up_base
from .prompts import prepare_prompt, with_system_prompt, with_template
from .reference_logps import compute_ref_logps
from .rewards import load_reward, task_reward
from .rng import seed_stage, stage_rng
from .rundir import claim

log = logging.getLogger("dqo.train")  # the trainer's log lines, as python -m dqo.train prints them


def behavior_source(mode: str, sampled_by: Optional[str], model: str) -> str:
    """``reference`` or ``recorded``: where the importance weights' behaviour log-probs come
    from (``--behavior-logp``; ``auto``: reference when ``model`` sampled the data)."""
    if mode != "auto":
        return mode
    return "reference" if sampled_by is not None and sampled_by == model_id(model) else "recorded"


def load_value_model(path: str, policy, dtype) -> ValueModel:
    """``--value-model``: a value model dqo saved, or any transformers checkpoint (a smaller
    critic; its scalar head starts new) whose vocabulary covers the policy's token ids."""
    value = ValueModel.from_pretrained(path, dtype=dtype)
    have, need = value.config.vocab_size, policy.config.vocab_size
    if have < need:
        raise UsageError(f"--value-model: {path} has a vocabulary of {have} tokens, the policy "
                         f"{need}: the critic must use the policy's tokenizer")
    return value


def prepare_models(args: TrainConfig, policy, value_model: Optional[str] = None,
                   examples: Optional[List[Example]] = None):
    """(policy, value) as the options say: LoRA adapters (the base frozen), the value model on
    a copy of the backbone or on the policy's base (``--value-backbone shared``), its head
    starting at the mean return of ``examples`` (``--value-init``; a ``value_model`` loaded
    from disk keeps its own), activation checkpointing of both. ``value`` is None for the
    algorithms without one. Call it after the reference log-probs: the reference is the policy
    as loaded."""
    needs_value = algos.REGISTRY[args.algo].needs_value
    value = None
    if needs_value and args.value_backbone == "separate":  # before the policy's adapter
        dtype, device = next(policy.parameters()).dtype, next(policy.parameters()).device
        value = (load_value_model(value_model, policy, dtype) if value_model
                 else ValueModel.from_policy(policy)).to(device)
    if args.lora_r:
        if needs_value and args.value_backbone == "shared" and resolve_engine_kind(
                args.engine) != "torch":
            raise UsageError("--value-backbone shared: runs on --engine torch (one GPU or the "
                             "CPU); with DeepSpeed use --value-backbone separate")
        cfg = lora.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                               args.lora_target_modules)
        with stage_rng(args.seed, "lora-init"):  # the adapters' random init: the run's seed
            policy = lora.add_policy_adapter(policy, cfg)
            if needs_value and args.value_backbone == "shared":
                value = SharedValueModel(policy, cfg)
            elif value is not None:
                value.backbone = lora.add_backbone_adapter(value.backbone, cfg)
        log.info("LoRA r=%d on %s: %.2fM trainable parameters of the policy", args.lora_r,
                 args.lora_target_modules,
                 sum(p.numel() for p in lora.policy_parameters(policy)) / 1e6)
    fresh_head = not value_model or not (Path(value_model) / "value_head.pt").is_file()
    if value is not None and examples and args.value_init == "mean-return" and fresh_head:
        start = mean_return(examples, args.gamma)
        init_value_head(value, start)
        log.info("value head: starts at the training rows' mean return %.4f (--value-init)",
                 start)
    if args.gradient_checkpointing:
        enable_checkpointing(policy)
        if isinstance(value, ValueModel):
            value.activation_checkpointing_enable()
    return policy, value


def run_default(args: TrainConfig, pipe: Optional[DefaultPipeline] = None) -> Dict:
    """The embedded default into ``args.out``, claimed first (:func:`dqo.rundir.claim`: a
    used directory, or a ``--resume`` with other options, is refused before the warm-up)."""
    with claim(args):
        return _run_default(args, pipe)


def _run_default(args: TrainConfig, pipe: Optional[DefaultPipeline]) -> Dict:
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
    record_start_evaluation(out_dir, before)
    log.info("base policy: greedy %.3f, sampled %.3f", before["greedy"],
             before.get("sampled", float("nan")))  # --eval-samples 0: greedy only

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
    compute_ref_logps(policy, examples, tok.pad_token_id, cache_dir=str(out_dir / "cache"),
                      progress=args.progress)
    # a LoRA adapter names its base: the warmed-up one on disk, so final/policy loads alone
    policy.name_or_path = str((out_dir / "base").resolve())
    policy, value = prepare_models(args, policy, examples=examples)
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
    """``--model PATH --data FILE``: train a real model on an offline dataset, into
    ``args.out`` claimed first (:func:`dqo.rundir.claim`)."""
    with claim(args):
        return _run_custom(args)


def _run_custom(args: TrainConfig) -> Dict:
    if torch.cuda.is_available():  # one GPU per process under the deepspeed/torchrun launchers
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    join_launcher_group(args.engine)
    tok, policy = load_policy(args.model, args.precision())
    # the data's own decoding settings (dqo.sample writes them beside it): its stop tokens
    # decide which rows finished, its length limit is the evaluation's
    decoding = find_decoding(sidecar(args.data))
    if decoding is None:
        log.info("no %s beside the data: stop tokens from the tokenizer and model, the paper's "
                 "sampling settings for evaluation", sidecar(args.data))
        decoding = DecodingConfig()
    decoding = with_system_prompt(with_template(
        args.decoding_config(decoding), args.prompt_template,
        None if args.reward_fn else args.task), args.system_prompt).with_stop_ids(tok, policy)
    rows, bad = read_jsonl(args.data, strict=args.strict_data)
    if args.algo == "sft":  # canonical solutions, never the sampled responses
        if args.sft_data:
            rows, bad = read_solutions(args.sft_data), []
        rows = sft_rows(rows, args.sft_data or args.data)
    if decoding.system_prompt is not None:  # the rows' prompts that have no system turn get it
        rows = [dict(r, prompt=prepare_prompt(r["prompt"], None, decoding.system_prompt))
                for r in rows]
    # the model's context is the length limit unless the user sets one: a huge row is cut to
    # fit (and trained as unfinished), never allowed to exhaust memory
    max_length = args.max_length or getattr(policy.config, "max_position_embeddings", None)
    examples, bad_tokens = tokenize_rows(rows, tok, max_length=max_length,
                                         strict=args.strict_data, stop_ids=decoding.stop_ids)
    check_bad_rows(args, bad + bad_tokens, len(rows) + len(bad))
    examples = truncated_examples(args, examples)
    source = behavior_source(args.behavior_logp, decoding.sampled_by, args.model)
    if source == "reference":  # the loss reads ref_logp where behavior_logp is None
        for e in examples:
            e.behavior_logp = None
    log.info("importance weights: behaviour log-probs from %s", {
        "reference": "the reference forward (the data were sampled by --model)",
        "recorded": "the rows' behavior_logp (recorded by the sampler)"}[source])
    if algos.REGISTRY[args.algo].needs_ref:
        compute_ref_logps(policy, examples, tok.pad_token_id,
                          cache_dir=str(Path(args.out) / "cache"), progress=args.progress)
    policy, value = prepare_models(args, policy, args.value_model, examples)
    eval_fn = None
    if args.eval_data:
        rows = read_prompt_rows(args.eval_data, require_answer=args.reward_fn is None,
                                prompt_column=args.prompt_column,
                                answer_column=args.answer_column)
        reward = (load_reward(args.reward_fn, args.correct_threshold, args.reward_timeout)
                  if args.reward_fn
                  else task_reward(args.task or "arithmetic", args.correct_threshold))
        prompts = [prepare_prompt(r["prompt"], decoding.prompt_template, decoding.system_prompt)
                   for r in rows]
        eval_fn = lambda: accuracy(  # noqa: E731
            policy, tok, prompts, [r.get("answer") for r in rows], reward,
            samples=args.eval_samples, decoding=decoding,
            columns=[extra_columns(r) for r in rows], progress=args.progress)
    seed_stage(args.seed, "evaluate-before")
    before = eval_fn() if eval_fn else {}
    record_start_evaluation(Path(args.out), before)
    tracker = open_tracker(args, Path(args.out))
    train(args, tok, policy, value, examples, eval_fn=eval_fn, decoding=decoding,
          tracker=tracker)
    seed_stage(args.seed, "evaluate-after")
    after = eval_fn() if eval_fn else {}
    res = {"before": before, "after": after}
    report_final(tracker, res)
    return res
