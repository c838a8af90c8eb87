"""Greedy and sampled accuracy of a policy on prompts, with the paper's protocol: a response cut
at the length limit is wrong, and the share of cut responses is reported beside each accuracy.
``python -m dqo.evaluate`` is its command line; the trainer's evaluations call it too."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .decoding import DecodingConfig
from .generation import Verifier, generate, reward_columns
from .generation.dataset import prompt_seed
from .generation.hf import generate_sharded
from .rewards import as_reward


def grade(reward, prompts: Sequence, answers: Sequence[Optional[str]],
          columns: Optional[Sequence[Dict]], flat: Sequence, n: int) -> List[bool]:
    """Whether each of the ``n`` samples a prompt (``flat``, prompt-major) is right: its
    reward counts as correct and it finished (a response cut at the length limit is wrong)."""
    cols: Dict[str, List] = {}
    for i, a in enumerate(answers):  # each prompt's columns, once per completion
        for k, v in reward_columns(a, columns[i] if columns else None, n).items():
            cols.setdefault(k, []).extend(v)
    scores = reward.scores([p for p in prompts for _ in range(n)], [s.text for s in flat], cols)
    return [good and s.finished for good, s in zip(reward.correct(scores), flat)]


def accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[Optional[str]],
             verify: Verifier, *, decoding: DecodingConfig, samples: int = 4,
             batch_size: int = 64, per_problem: bool = False,
             columns: Optional[Sequence[Dict]] = None, progress: bool = False,
             seed: Optional[int] = None, sharded: bool = False) -> Dict:
    """``greedy`` and ``sampled`` accuracy (a cut response is wrong), and the share of
    responses cut at ``decoding.max_new_tokens`` (``greedy_cut``, ``sampled_cut``). With
    ``per_problem``, also each problem's score (``greedy_items``, ``sampled_items``: the share
    of its responses that are right), for paired statistics over problems. ``progress``: a
    progress bar over the generation batches. ``seed``: prompt i's k-th sample draws from its
    own generator, seeded from (``seed``, i, k) as :mod:`dqo.sample` seeds them, so the draws
    do not depend on the batch size or the ranks (without it, torch's global generator).
    ``sharded`` (a Hugging Face model): under a launcher, the ranks share the generation
    batches (:func:`dqo.generation.hf.generate_sharded`) and every rank returns the figures one
    process returns (with ``seed``)."""
    decoding = decoding.with_stop_ids(tokenizer, model)
    reward = as_reward(verify)
    out = {}
    runs = [("greedy", 1, True)] + ([("sampled", samples, False)] if samples > 0 else [])
    seeds = None if seed is None else [prompt_seed(seed, i) for i in range(len(prompts))]
    for name, n, greedy in runs:
        gen = generate_sharded if sharded and isinstance(model, torch.nn.Module) else generate
        res = gen(model, tokenizer, prompts, n=n, greedy=greedy, decoding=decoding,
                  batch_size=batch_size, seeds=seeds, progress=progress)
        flat = [s for ss in res for s in ss]
        right = [float(x) for x in grade(reward, prompts, answers, columns, flat, n)]
        out[name] = sum(right) / max(1, len(flat))
        out[f"{name}_cut"] = sum(not s.finished for s in flat) / max(1, len(flat))
        if per_problem:
            out[f"{name}_items"] = [sum(right[i * n:(i + 1) * n]) / n for i in range(len(res))]
    return out


def critic_evaluation(model, tokenizer, prompts: Sequence, answers: Sequence[Optional[str]],
                      verify: Verifier, *, decoding: DecodingConfig, n: int,
                      rules: Sequence[str] = (), value=None, reference=None, beta: float = 0.1,
                      task: Optional[str] = None, batch_size: int = 64,
                      columns: Optional[Sequence[Dict]] = None, seed: int = 0,
                      sharded: bool = False, progress: bool = False) -> Dict:
    """``n`` samples a prompt (seeded as :func:`accuracy` seeds them), graded, and read two
    ways: ``best_of``, the accuracy of each of ``rules``' picks (:mod:`dqo.reranking`; with
    ``n`` > 1), and with a ``value`` model ``process``, the critic measured as a process reward
    model (:mod:`dqo.process_metrics`; exact step labels where the prompts are the synthetic
    task's problems)."""
    from . import process_metrics, reranking

    decoding = decoding.with_stop_ids(tokenizer, model)
    seeds = [prompt_seed(seed, i) for i in range(len(prompts))]
    gen = generate_sharded if sharded and isinstance(model, torch.nn.Module) else generate
    samples = gen(model, tokenizer, prompts, n=n, decoding=decoding, batch_size=batch_size,
                  seeds=seeds, progress=progress)
    flat = [s for ss in samples for s in ss]
    ok = grade(as_reward(verify), prompts, answers, columns, flat, n)
    right = [ok[i * n:(i + 1) * n] for i in range(len(prompts))]
    out: Dict = dict(n=n)
    if rules and n > 1:
        extract = reranking.answer_extractor(task)
        out["best_of"] = reranking.best_of_n(
            right, rules=rules, seed=seed,
            values=(reranking.final_values(value, tokenizer, prompts, samples)
                    if "value" in rules else None),
            returns=(reranking.implied_returns(model, reference, tokenizer, prompts, samples,
                                               beta) if "q" in rules else None),
            answers=[[extract(s.text) for s in ss] for ss in samples])
    if value is not None:
        groups = process_metrics.critic_records(value, tokenizer, prompts, samples, right)
        out["process"] = process_metrics.process_metrics(groups)
    return out
