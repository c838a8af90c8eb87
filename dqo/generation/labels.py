"""Sampled responses -> rows of the data format (:mod:`dqo.data.schema`): each graded by the
reward (a built-in task's verifier or a user's function), with the prompt's columns."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..data.schema import response_row
from ..rewards import as_reward
from .types import Sample, Verifier


def reward_columns(answer, extra: Optional[Dict], n: int) -> Dict[str, List]:
    """A reward function's ``**columns`` for ``n`` completions of one prompt."""
    cols = {} if answer is None else {"answer": [answer] * n}
    cols.update({k: [v] * n for k, v in (extra or {}).items()})
    return cols


def label_samples(prompts, answers, samples: List[List[Sample]], verify: Verifier, *,
                  grade_truncated: bool = False,
                  solutions: Optional[Sequence[Optional[str]]] = None,
                  columns: Optional[Sequence[Dict]] = None) -> List[Dict]:
    """Rows for the trainer: the reward of each response (built-in tasks: 1 if the final
    answer is right, else 0, paper app. A) and whether it is ``correct`` (reward >= the
    threshold). A response cut at the length limit gets 0 and is not correct, unless
    ``grade_truncated``: then it is graded as it stands and counts as having ended
    (``finished: true``, no bootstrap on top of its grade). A prompt's canonical ``solution``
    and its other ``columns`` (a reward function's extra inputs) ride along."""
    reward = as_reward(verify)
    rows = []
    for i, (p, a, ss) in enumerate(zip(prompts, answers, samples)):
        extra = dict(columns[i]) if columns else {}
        scores = reward.scores([p] * len(ss), [s.text for s in ss],
                               reward_columns(a, extra, len(ss)))
        if solutions and solutions[i] is not None:
            extra["solution"] = solutions[i]
        for s, score, good in zip(ss, scores, reward.correct(scores)):
            ended = s.finished or grade_truncated
            rows.append(response_row(p, s.text, response_ids=s.ids, behavior_logp=s.logp,
                                     finished=ended, reward=score if ended else 0.0,
                                     correct=bool(good and ended), answer=a, **extra))
    return rows
