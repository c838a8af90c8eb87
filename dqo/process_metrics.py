"""The learned value as a process reward model, measured on sampled responses.

Each response is read by the critic alone (:func:`dqo.scoring.score_response`'s ``drop``):
``V_after(k)`` is the value of the state after step k (for the last step, the state the stop
token is chosen in), and the step whose value falls most, ``V_after(k) - V_before(k)`` lowest,
is the one the critic marks as the first error (``dqo.score``'s mark).
Against exact step labels (the synthetic task's; label k: the prefix up to step k is right):

- ``step_auc``: P(V after a right prefix > V after a wrong one), over all steps of all
  responses (the paper's Figure 2 as one number; 0.5 is no information);
- ``first_error``: over the responses with a wrong step, the share where the marked step is
  the first wrong one; ``first_error_chance``: the same share for a step drawn uniformly.

And for any task, ``outcome_auc``: P(V(s_T) of a right response > that of a wrong one), over
all pairs, and ``outcome_auc_within``: the same over the pairs of responses to one problem,
what a reranker needs (a critic that only knows which problems are hard has an outcome AUC
above 0.5 and a within-problem one of 0.5). Every
figure has a 95% bootstrap interval over problems (a problem's responses resampled
together: :func:`dqo.stats.cluster_bootstrap_ci`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .scoring import score_response
from .stats import auc, cluster_bootstrap_ci
from .tasks import arithmetic

LabelFn = Callable[[object, str], Optional[List[bool]]]


def read_steps(value, tokenizer, prompt, sample, labels: Optional[List[bool]]) -> List[Dict]:
    """The critic's reading of one sample (:func:`dqo.scoring.score_response`'s ``drop`` and
    mark): one dict per step with tokens and text (``step``: its 1-based index among them,
    ``value``: V after it, read to V(s_T) after the last one, ``drop``, ``label``, ``marked``)."""
    if not sample.ids:
        return []
    steps = score_response(None, None, value, tokenizer, prompt, list(sample.ids),
                           text=sample.text, finished=sample.finished, gamma=1.0, labels=labels)
    out = []
    for s in steps:
        if s.tokens and s.text.strip():
            out.append(dict(step=len(out) + 1, value=s.value_before + s.drop, drop=s.drop,
                            label=s.label, marked=s.likely_first_error))
    return out


def pooled_step_auc(groups) -> float:
    pts = [s for g in groups for r in g for s in r["steps"] if s["label"] is not None]
    return auc([s["value"] for s in pts if s["label"]], [s["value"] for s in pts if not s["label"]])


def pooled_outcome_auc(groups) -> float:
    rs = [r for g in groups for r in g if r["final"] is not None]
    return auc([r["final"] for r in rs if r["right"]], [r["final"] for r in rs if not r["right"]])


def pooled_outcome_auc_within(groups) -> float:
    """P(V(s_T) of a right response > that of a wrong response to the same problem), ties
    counting one half, over every such pair."""
    wins = pairs = 0.0
    for g in groups:
        rs = [r for r in g if r["final"] is not None]
        pos = [r["final"] for r in rs if r["right"]]
        neg = [r["final"] for r in rs if not r["right"]]
        wins += sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        pairs += len(pos) * len(neg)
    return wins / pairs if pairs else float("nan")


def pooled_first_error(groups) -> float:
    hits = [r["first_error_hit"] for g in groups for r in g if r["first_error_hit"] is not None]
    return sum(hits) / len(hits) if hits else float("nan")


def pooled_first_error_chance(groups) -> float:
    xs = [1 / len(r["steps"]) for g in groups for r in g if r["first_error_hit"] is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def critic_records(value, tokenizer, prompts: Sequence, samples: Sequence[Sequence],
                   right: Sequence[Sequence[bool]],
                   labels: Optional[LabelFn] = arithmetic.prompt_step_labels) -> List[List[Dict]]:
    """Per problem, per sample: ``steps`` (:func:`read_steps`), ``final`` (V after the last
    step), ``right`` (the graded outcome) and ``first_error_hit`` (None without a wrong
    labelled step)."""
    groups = []
    for prompt, ss, rr in zip(prompts, samples, right):
        group = []
        for s, ok in zip(ss, rr):
            lab = labels(prompt, s.text) if labels else None
            steps = read_steps(value, tokenizer, prompt, s, lab)
            wrong = [x["step"] for x in steps if x["label"] is False]
            marked = [x["step"] for x in steps if x["marked"]]
            group.append(dict(steps=steps, right=bool(ok),
                              final=steps[-1]["value"] if steps else None,
                              first_error_hit=(marked[:1] == wrong[:1]) if wrong else None))
        groups.append(group)
    return groups


def process_metrics(groups: List[List[Dict]], resamples: int = 2000) -> Dict:
    """The figures of the module docstring from :func:`critic_records`' groups."""
    steps = [s for g in groups for r in g for s in r["steps"]]
    labelled = [s for s in steps if s["label"] is not None]
    out = dict(problems=len(groups), responses=sum(len(g) for g in groups), steps=len(steps),
               outcome_auc=pooled_outcome_auc(groups),
               outcome_auc_ci=cluster_bootstrap_ci(groups, pooled_outcome_auc, resamples),
               outcome_auc_within=pooled_outcome_auc_within(groups),
               outcome_auc_within_ci=cluster_bootstrap_ci(groups, pooled_outcome_auc_within,
                                                          resamples))
    if labelled:
        pos = [s["value"] for s in labelled if s["label"]]
        neg = [s["value"] for s in labelled if not s["label"]]
        located = [r for g in groups for r in g if r["first_error_hit"] is not None]
        out.update(
            labelled_steps=len(labelled),
            mean_value_right_prefix=sum(pos) / len(pos) if pos else float("nan"),
            mean_value_wrong_prefix=sum(neg) / len(neg) if neg else float("nan"),
            step_auc=pooled_step_auc(groups),
            step_auc_ci=cluster_bootstrap_ci(groups, pooled_step_auc, resamples),
            responses_with_error=len(located),
            first_error=pooled_first_error(groups),
            first_error_ci=cluster_bootstrap_ci(groups, pooled_first_error, resamples),
            first_error_chance=pooled_first_error_chance(groups))
    return out
