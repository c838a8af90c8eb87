"""Best-of-N: N sampled responses a problem, one picked by a rule, accuracy of the picks.

The rules, all on the same samples (docs/math.md §1 for ``Q`` and ``V``):

- ``value``: the highest learned value of the state the response ends in, ``V(s_T)``, the state
  after its last token before the stop token (after its last token, for a response cut at the
  length limit): the critic's estimate of the response's return.
- ``q``: the highest return the policy implies. Summing the soft Bellman relation
  ``beta * log(pi(a_t|s_t) / pi_ref(a_t|s_t)) = Q(s_t, a_t) - V(s_t) = r_t + V(s_{t+1}) - V(s_t)``
  along a finished response telescopes to ``sum_t r_t = V(s_0) + beta * sum_t l_t``; the N
  responses of one problem share ``V(s_0)``, so the rule ranks by ``beta * sum_t l_t`` (DPO's
  implicit reward) and needs the reference policy, not the value model.
- ``majority``: the most common final answer (the task's answer extraction; ties and responses
  without an answer: the first drawn of the most common).
- ``random``: one at random (seeded).

Beside them, ``mean`` (the accuracy of a single sample: the share of right responses) and
``oracle`` (some sample is right: pass@N). Every figure is a mean over problems with a 95%
bootstrap interval over problems (:mod:`dqo.stats`), and each rule's difference from ``mean``
(what a random pick gets in expectation), paired on the same problems, with its interval.
"""
from __future__ import annotations

import random as _random
from collections import Counter
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .data import Example, collate
from .decoding import encode_prompt
from .reference_logps import ref_logps
from .stats import bootstrap_ci

RULES = ("value", "q", "majority", "random")


def _normal(ans: Optional[str]) -> Optional[str]:
    if ans is None:
        return None
    ans = ans.strip().replace(",", "")
    try:
        return str(Fraction(ans))  # "3.50" and "7/2" vote together
    except (ValueError, ZeroDivisionError):
        return " ".join(ans.split())


def answer_extractor(task: Optional[str]) -> Callable[[str], Optional[str]]:
    """The final answer of a response, as ``task``'s checker reads it (for the majority vote):
    the number after ``####`` (arithmetic, gsm8k; gsm8k-flexible: else the last number), the
    last ``\\boxed{}`` (math); without a task (a ``--reward-fn``), the response's last
    non-blank line."""
    from .tasks.verify import extract_hash_answer, extract_last_number, last_boxed

    if task in ("arithmetic", "gsm8k"):
        return lambda t: _normal(extract_hash_answer(t))
    if task == "gsm8k-flexible":
        return lambda t: _normal(extract_hash_answer(t) or extract_last_number(t))
    if task == "math":
        return lambda t: _normal(last_boxed(t))
    return lambda t: _normal(next((x for x in reversed(t.split("\n")) if x.strip()), None))


def _examples(tokenizer, prompts, samples) -> List[Example]:
    out = []
    for p, ss in zip(prompts, samples):
        pids = encode_prompt(tokenizer, p)
        out += [Example(pids, list(s.ids), [0.0] * len(s.ids)) for s in ss]
    return out


@torch.no_grad()
def final_values(value, tokenizer, prompts: Sequence, samples: Sequence[Sequence],
                 batch_size: int = 16) -> List[List[float]]:
    """``V(s_T)`` of every sample (see the module docstring), shaped as ``samples``."""
    exs = _examples(tokenizer, prompts, samples)
    flat_s = [s for ss in samples for s in ss]
    device = next(value.parameters()).device
    out: List[float] = []
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        b = collate(chunk, tokenizer.pad_token_id).to(device)
        values, after = value(b.input_ids, b.attention_mask, with_after=True)
        for j, e in enumerate(chunk):
            n, s = len(e), flat_s[i + j]
            if not e.response_ids:  # nothing generated: the state after the prompt
                out.append(float(after[j, n - 1]))
            elif s.finished:  # the state the stop token is chosen in
                out.append(float(values[j, n - 1]))
            else:  # cut: the state after its last token
                out.append(float(after[j, n - 1]))
    return _shape(out, samples)


def implied_returns(policy, reference, tokenizer, prompts: Sequence, samples: Sequence[Sequence],
                    beta: float, batch_size: int = 16) -> List[List[float]]:
    """``beta * sum_t log(pi / pi_ref)`` over every sample's tokens, shaped as ``samples``: the
    per-token log-probs of both models as the trainer's reference pass computes them
    (:func:`dqo.reference_logps.ref_logps`)."""
    exs = _examples(tokenizer, prompts, samples)
    pad = tokenizer.pad_token_id
    lp = ref_logps(policy, exs, pad, batch_size=batch_size)
    ref = ref_logps(reference, exs, pad, batch_size=batch_size)
    return _shape([beta * sum(a - b for a, b in zip(x, y)) for x, y in zip(lp, ref)], samples)


def _shape(flat: List[float], samples) -> List[List[float]]:
    out, k = [], 0
    for ss in samples:
        out.append(flat[k:k + len(ss)])
        k += len(ss)
    return out


def picks(rule: str, *, scores: Optional[List[List[float]]] = None,
          answers: Optional[List[List[Optional[str]]]] = None, sizes: Sequence[int] = (),
          seed: int = 0) -> List[int]:
    """The index of the sample ``rule`` picks for every problem: the highest of ``scores``
    (``value``, ``q``; ties: the first drawn), the first of the most common of ``answers``
    (``majority``), or a seeded draw (``random``, over ``sizes``)."""
    if rule in ("value", "q"):
        return [max(range(len(s)), key=lambda k: (s[k], -k)) for s in scores]
    if rule == "majority":
        out = []
        for ans in answers:
            votes = Counter(a for a in ans if a is not None)
            if not votes:
                out.append(0)
                continue
            top = max(votes.values())
            out.append(next(k for k, a in enumerate(ans) if a is not None and votes[a] == top))
        return out
    if rule == "random":
        rng = _random.Random(seed)
        return [rng.randrange(n) for n in sizes]
    raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")


def best_of_n(right: Sequence[Sequence[bool]], *, rules: Sequence[str],
              values: Optional[List[List[float]]] = None,
              returns: Optional[List[List[float]]] = None,
              answers: Optional[List[List[Optional[str]]]] = None,
              seed: int = 0, resamples: int = 2000) -> Dict:
    """Accuracy of each rule's picks over the problems whose samples are graded ``right``
    (a cut response is wrong), with ``mean`` and ``oracle``: ``{rule: {acc, ci, minus_mean,
    minus_mean_ci, items}}`` (``items``: each problem's 0/1, for paired statistics;
    ``minus_mean``: the rule's gain over one sample, paired on the problems: ``mean`` is the
    expected accuracy of a random pick, without the noise of one draw)."""
    sizes = [len(r) for r in right]
    if not sizes or min(sizes) == 0:
        raise ValueError("right: expected at least one sample for every problem")
    inputs = dict(value=values, q=returns, majority=answers)
    items: Dict[str, List[float]] = {
        "mean": [sum(r) / len(r) for r in right],
        "oracle": [float(any(r)) for r in right]}
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"rules: expected some of {RULES}, got {rule!r}")
        if rule != "random" and inputs[rule] is None:
            need = dict(value="values", q="returns", majority="answers")[rule]
            raise ValueError(f"rules: {rule!r} needs {need}")
        chosen = picks(rule, scores=inputs.get(rule), answers=answers, sizes=sizes, seed=seed)
        items[rule] = [float(r[k]) for r, k in zip(right, chosen)]
    if "random" not in items:
        items["random"] = [float(r[k]) for r, k in
                           zip(right, picks("random", sizes=sizes, seed=seed))]
    out = {}
    for name, xs in items.items():
        res = dict(acc=sum(xs) / len(xs), ci=bootstrap_ci(xs, resamples), items=xs)
        if name not in ("mean", "oracle"):
            diff = [a - b for a, b in zip(xs, items["mean"])]
            res.update(minus_mean=sum(diff) / len(diff),
                       minus_mean_ci=bootstrap_ci(diff, resamples))
        out[name] = res
    return out
