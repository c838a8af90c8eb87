"""The critic as a process reward model (dqo.process_metrics) and the intervals (dqo.stats)."""
import itertools
import math

import pytest
import torch

from dqo import process_metrics as PM
from dqo.generation.types import Sample
from dqo.modeling import ValueModel
from dqo.stats import auc, bootstrap_ci, cluster_bootstrap_ci
from dqo.tasks import arithmetic


def test_auc_is_the_share_of_ordered_pairs_ties_half():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pos = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),),
                            generator=g).tolist()
        neg = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),),
                            generator=g).tolist()
        brute = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
        assert auc(pos, neg) == pytest.approx(brute / (len(pos) * len(neg)), abs=1e-12)
    assert math.isnan(auc([], [1.0]))


def test_intervals_cover_the_estimate_and_shrink_with_data():
    g = torch.Generator().manual_seed(1)
    small = (torch.rand(20, generator=g) < 0.5).double().tolist()
    large = (torch.rand(2000, generator=g) < 0.5).double().tolist()
    lo, hi = bootstrap_ci(small, 500)
    assert lo <= sum(small) / 20 <= hi
    lo2, hi2 = bootstrap_ci(large, 500)
    assert hi2 - lo2 < (hi - lo) / 4
    groups = [[x] for x in small]
    assert cluster_bootstrap_ci(groups, lambda gs: sum(x[0] for x in gs) / len(gs), 500) == \
        pytest.approx(bootstrap_ci(small, 500), abs=0.06)
    assert cluster_bootstrap_ci([[1.0]], lambda gs: float("nan"), 10) != \
        cluster_bootstrap_ci([[1.0]], lambda gs: 1.0, 10)


class OracleCritic(torch.nn.Module):
    """V after each response token: 1 while every line the response has completed so far is
    right (exact labels of ``text``), 0 from the last character of the first wrong line on (or
    from ``drop_at`` characters, when given): a critic that knows the exact labels."""

    def __init__(self, tok, text, labels, prompt_len, drop_at=None):
        super().__init__()
        self.tok, self.prompt_len = tok, prompt_len
        ends, c = [], 0
        for line in text.split("\n"):
            c += len(line)
            ends.append(c)  # characters up to this line's last one
            c += 1
        first_wrong = next((e for e, ok in zip(ends, labels) if not ok), None)
        self.drop_at = drop_at if drop_at is not None else first_wrong
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, with_after=False):
        ids = input_ids[0].tolist()
        after = [1.0 if t < self.prompt_len or self.drop_at is None else
                 float(len(self.tok.decode(ids[self.prompt_len:t + 1])) < self.drop_at)
                 for t in range(len(ids))]
        after = torch.tensor([after])
        values = torch.cat([torch.zeros(1, 1), after[:, :-1]], 1)
        return (values, after) if with_after else values


def _wrong_at_step_2(problem):
    lines = problem.solution.split("\n")
    lines[1] = lines[1][:-1] + str((int(lines[1][-1]) + 1) % 10)
    return "\n".join(lines)


@pytest.mark.parametrize("drop", ["at_the_error", "too_early"])
def test_first_error_and_step_auc_from_an_oracle_critic(tok, drop):
    from dqo.decoding import encode_prompt
    problem = next(p for p in arithmetic.make_problems(50, 5) if len(p.ops) == 3)
    text = _wrong_at_step_2(problem)
    labels = arithmetic.step_labels(problem, text)
    assert labels[:2] == [True, False]
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    sample = Sample(text, ids, [0.0] * len(ids), True)
    plen = len(encode_prompt(tok, problem.prompt))
    drop_at = None if drop == "at_the_error" else 2  # inside step 1: the wrong step marked
    critic = OracleCritic(tok, text, labels, plen, drop_at)
    groups = PM.critic_records(critic, tok, [problem.prompt], [[sample]], [[False]])
    rec = groups[0][0]
    assert [s["label"] for s in rec["steps"]] == [x for x, line in zip(labels, text.split("\n"))
                                                   if line.strip()]
    assert [s["marked"] for s in rec["steps"]].count(True) == 1
    m = PM.process_metrics(groups, resamples=50)
    assert m["responses_with_error"] == 1
    assert m["first_error_chance"] == pytest.approx(1 / len(rec["steps"]))
    if drop == "at_the_error":
        assert rec["steps"][1]["marked"] and rec["first_error_hit"] is True
        assert m["first_error"] == 1.0 and m["step_auc"] == 1.0
        assert m["mean_value_right_prefix"] == 1.0 and m["mean_value_wrong_prefix"] == 0.0
    else:
        assert rec["steps"][0]["marked"] and rec["first_error_hit"] is False
        assert m["first_error"] == 0.0 and m["step_auc"] < 1.0


def test_records_on_a_real_value_model_match_its_forward(tok, policy):
    """The plumbing on a trained-shaped model: V after the last step is V(s_T), the state the
    stop token is chosen in; unlabelled prompts give the outcome AUC only."""
    from dqo.decoding import encode_prompt
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight, std=0.5)
    problems = arithmetic.make_problems(4, 3)
    samples, right = [], []
    for i, p in enumerate(problems):
        text = p.solution if i % 2 else _wrong_at_step_2(p)
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        samples.append([Sample(text, ids, [0.0] * len(ids), True)])
        right.append([bool(i % 2)])
    groups = PM.critic_records(value, tok, [p.prompt for p in problems], samples, right)
    for p, ss, g in zip(problems, samples, groups):
        full = torch.tensor([encode_prompt(tok, p.prompt) + ss[0].ids])
        with torch.no_grad():
            v = value(full, torch.ones_like(full))
        assert g[0]["final"] == pytest.approx(float(v[0, -1]), abs=1e-5)
        assert len(g[0]["steps"]) == len([x for x in ss[0].text.split("\n") if x.strip()])
    m = PM.process_metrics(groups, resamples=50)
    assert m["responses"] == 4 and m["responses_with_error"] == 2 and "step_auc" in m
    unlabelled = PM.critic_records(value, tok, [p.prompt for p in problems], samples, right,
                                   labels=None)
    m = PM.process_metrics(unlabelled, resamples=50)
    assert "step_auc" not in m and 0 <= m["outcome_auc"] <= 1


def test_outcome_auc_within_a_problem_sees_through_difficulty():
    """A critic that only knows which problems are hard ranks responses across problems well
    and within a problem not at all: the reranker's view is the within-problem AUC."""
    def rec(final, right):
        return dict(steps=[], right=right, final=final, first_error_hit=None)
    easy = [rec(0.9, True), rec(0.9, True), rec(0.9, False)]
    hard = [rec(0.1, False), rec(0.1, True), rec(0.1, False)]
    groups = [easy, hard]
    assert PM.pooled_outcome_auc(groups) > 0.6
    assert PM.pooled_outcome_auc_within(groups) == 0.5
    knows = [[rec(0.9, True), rec(0.2, False)], [rec(0.5, True), rec(0.6, False)]]
    assert PM.pooled_outcome_auc_within(knows) == 0.5  # one pair ordered, one reversed
    assert math.isnan(PM.pooled_outcome_auc_within([[rec(0.3, True)]]))
