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
        cols: Dict[str, List] = {}
        for i, a in enumerate(answers):  # each prompt's columns, once per completion
            for k, v in reward_columns(a, columns[i] if columns else None, n).items():
                cols.setdefault(k, []).extend(v)
        scores = reward.scores([p for p in prompts for _ in range(n)],
                               [s.text for s in flat], cols)
        ok = reward.correct(scores)
        right = [float(good and s.finished) for good, s in zip(ok, flat)]
        out[name] = sum(right) / max(1, len(flat))
        out[f"{name}_cut"] = sum(not s.finished for s in flat) / max(1, len(flat))
        if per_problem:
            out[f"{name}_items"] = [sum(right[i * n:(i + 1) * n]) / n for i in range(len(res))]
    return out
