"""Process rewards (paper 4.4): the steps of a failed response that lead somewhere earn a share
of a correct answer's reward, from Monte-Carlo completions (:func:`mc_process_scores`) or from
exact step labels (:func:`exact_process_scores`). A step is a non-blank line of the response."""
from __future__ import annotations

from typing import Callable, Dict, List

from ..data.schema import extra_columns
from ..data.tokenize import split_steps
from ..decoding import DecodingConfig
from ..rewards import as_reward
from .hf import generate
from .labels import reward_columns
from .types import Verifier

# Process rewards (paper 4.4) are a bonus, never a second outcome: a failed response's steps
# judged correct share at most this much of a correct answer's reward (1).
PROCESS_REWARD_TOTAL = 0.5


def step_lines(response: str) -> List[int]:
    """Indices (among the response's lines, :func:`dqo.data.split_steps`) of its steps: the
    non-blank lines. A blank line is not a step: it earns nothing and is no place to cut."""
    return [i for i, line in enumerate(split_steps(response)) if line.strip()]


def mc_process_scores(model, tokenizer, rows: List[Dict], verify: Verifier, *,
                      decoding: DecodingConfig, n: int = 20,
                      total: float = PROCESS_REWARD_TOTAL, batch_size: int = 64) -> List[Dict]:
    """Paper 4.4: for each failed response with steps s_1..s_K, sample ``n`` completions
    from every prefix s_1..s_k (k < K); if one of them is correct, steps 1..k are judged
    correct. Each of them earns ``total / K`` (:func:`with_step_rewards`). Rows keep their
    tokens and behaviour log-probs and gain ``steps``/``step_rewards``."""
    reward = as_reward(verify)
    failed = [r for r in rows if not r.get("correct", r["reward"] > 0)
              and len(step_lines(r["response"])) > 1]
    queries = []  # (row, k, prefix)
    for r in failed:
        lines, steps = split_steps(r["response"]), step_lines(r["response"])
        for k in range(1, len(steps)):
            queries.append((r, k, "\n".join(lines[:steps[k - 1] + 1]) + "\n"))
    best: Dict[int, int] = {}
    if queries:
        samples = generate(model, tokenizer, [q[0]["prompt"] for q in queries], n=n,
                           prefixes=[q[2] for q in queries], decoding=decoding,
                           batch_size=batch_size)
        for (r, k, prefix), ss in zip(queries, samples):
            extra = extra_columns(r)
            scores = reward.scores([r["prompt"]] * len(ss), [prefix + s.text for s in ss],
                                   reward_columns(r.get("answer"), extra, len(ss)))
            if any(good and s.finished for good, s in zip(reward.correct(scores), ss)):
                best[id(r)] = max(best.get(id(r), 0), k)
    failed_ids = {id(r) for r in failed}
    return [with_step_rewards(r, best.get(id(r), 0), total) if id(r) in failed_ids else r
            for r in rows]


def exact_process_scores(rows: List[Dict], step_labels: Callable[[str, str], List[bool]], *,
                         total: float = PROCESS_REWARD_TOTAL) -> List[Dict]:
    """The same from exact step labels (the synthetic task knows them, one per line): in a
    failed response, the leading correct steps earn ``total / K`` each."""
    out = []
    for r in rows:
        steps = step_lines(r["response"])
        if r.get("correct", r["reward"] > 0) or len(steps) < 2:
            out.append(r)
            continue
        labels = step_labels(r["prompt"], r["response"])
        k = 0
        while k < len(steps) and labels[steps[k]]:
            k += 1
        out.append(with_step_rewards(r, k, total))
    return out


def with_step_rewards(row: Dict, k: int, total: float = PROCESS_REWARD_TOTAL) -> Dict:
    """``row`` with its first ``k`` steps (non-blank lines) rewarded ``total / K`` each, K its
    number of steps: the step rewards of a response sum to less than ``total``, whatever its
    length (k < K for a failed response)."""
    if not 0.0 <= total < 1.0:
        raise ValueError(f"total: expected a value in [0, 1) (a share of a correct answer's "
                         f"reward), got {total!r}")
    lines, steps = split_steps(row["response"]), step_lines(row["response"])
    rewarded = set(steps[:k])
    per_step = total / len(steps)
    return dict(row, steps=lines,
                step_rewards=[per_step if i in rewarded else 0.0 for i in range(len(lines))])
