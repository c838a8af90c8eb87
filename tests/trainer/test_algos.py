"""Baselines on the same offline samples: loss functions and a few training steps each."""
import json
import math

import pytest
import torch

from dqo import algos
from dqo import data as D
from dqo.configs import TrainConfig
from dqo.loop import train
from dqo.losses import dpo_loss, kto_loss, kto_reference_point, kto_weights, sequence_sum
from dqo.modeling import ValueModel, build_policy, tiny_config
from dqo.reference_logps import compute_ref_logps
from dqo.tokenizer import char_tokenizer
from dqo_kernels import dro_loss


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_and_gradient_by_hand():
    """TRL's sigmoid DPO: -log sigmoid(beta * ((c - cr) - (r - rr))), mean over pairs."""
    c = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-2.0, -4.0], dtype=torch.float64, requires_grad=True)
    cr, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-2.0, -3.0])
    beta = 0.5
    loss = dpo_loss(c, r, cr.double(), rr.double(), beta=beta)
    m = [(-3 + 2.5) - (-2 + 2.0), (-1 + 2.0) - (-4 + 3.0)]  # -0.5, 2.0
    assert loss.item() == pytest.approx(sum(-math.log(sig(beta * x)) for x in m) / 2, abs=1e-12)
    loss.backward()
    # d/dm of -log sig(beta m) is -beta sig(-beta m); c enters m with +1, r with -1
    assert c.grad.tolist() == pytest.approx([-beta * sig(-beta * x) / 2 for x in m], abs=1e-12)
    assert r.grad.tolist() == pytest.approx([beta * sig(-beta * x) / 2 for x in m], abs=1e-12)


def test_kto_loss_and_gradient_by_hand():
    """TRL's KTO: z0 = max(0, mean log-ratio of mismatched pairs), detached; weighted losses."""
    logp = torch.tensor([-1.0, -3.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -2.5, -2.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    kl_logp = torch.tensor([-4.0, -3.0, -5.0], dtype=torch.float64, requires_grad=True)
    kl_ref = torch.tensor([-4.5, -3.5, -5.5], dtype=torch.float64)
    beta, ld, lu = 0.5, 1.5, 1.0
    z0 = kto_reference_point(kl_logp, kl_ref)
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    loss = kto_loss(logp, ref, desirable, z0, beta=beta, lambda_d=ld, lambda_u=lu)
    r = [1.0, -0.5, 0.0]
    expect = (ld * (1 - sig(beta * (r[0] - 0.5))) + lu * (1 - sig(beta * (0.5 - r[1])))
              + ld * (1 - sig(beta * (r[2] - 0.5)))) / 3
    assert loss.item() == pytest.approx(expect, abs=1e-12)
    loss.backward()
    dsig = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    assert logp.grad.tolist() == pytest.approx([-ld * beta * dsig(beta * (r[0] - 0.5)) / 3,
                                                lu * beta * dsig(beta * (0.5 - r[1])) / 3,
                                                -ld * beta * dsig(beta * (r[2] - 0.5)) / 3],
                                               abs=1e-12)
    assert kl_logp.grad is None  # the reference point is a constant of the loss
    # a negative mean log-ratio is clamped at 0
    assert kto_reference_point(kl_ref, kl_logp.detach()).item() == 0.0


def test_kto_weights_follow_the_ratio_rule():
    for n_d, n_u, lam_d in ((30, 70, 70 / 30), (50, 50, 1.0), (60, 40, 4 / 3 * 40 / 60),
                            (55, 45, 1.0)):
        d, u = kto_weights(n_d, n_u)
        assert (d, u) == (pytest.approx(lam_d), 1.0)
        assert 1.0 - 1e-12 <= d * n_d / (u * n_u) <= 4 / 3 + 1e-12


def test_kto_reference_pairs_mismatch_every_prompt(setup):
    _, _, exs = setup
    pairs = algos.make("kto").items(exs)
    assert [e for e, _ in pairs] == exs
    for e, kl in pairs:
        assert kl.prompt_ids == e.prompt_ids and kl.response_ids != e.response_ids
        source = next(x for x in exs if x.response_ids == kl.response_ids)
        assert source.prompt != e.prompt  # another prompt's response


def test_dro_loss_and_gradient_by_hand():
    """DRO (Richemond et al.): 0.5 (beta l + V - r)^2, policy through l, value through V."""
    logp = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-3.5, -4.0], dtype=torch.float64)
    v = torch.tensor([0.2, 0.6], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    beta = 0.3
    out = dro_loss(logp, ref, v, r, beta=beta, backend="torch")
    delta = [beta * 0.5 + 0.2 - 1.0, beta * -1.0 + 0.6 - 0.0]
    assert out.policy_loss.item() == pytest.approx(sum(0.5 * d * d for d in delta) / 2)
    assert out.value_loss.item() == pytest.approx(sum(0.5 * d * d for d in delta) / 2)
    out.loss.backward()
    assert logp.grad.tolist() == pytest.approx([beta * d / 2 for d in delta], abs=1e-12)
    assert v.grad.tolist() == pytest.approx([d / 2 for d in delta], abs=1e-12)


def test_sequence_sum_ignores_padding_garbage():
    x = torch.tensor([[float("nan"), 1.0, 2.0], [3.0, 4.0, float("inf")]])
    m = torch.tensor([[False, True, True], [True, True, False]])
    torch.testing.assert_close(sequence_sum(x, m), torch.tensor([3.0, 7.0]))


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    rows = []
    for i in range(8):  # 8 prompts x 4 responses, 2 right and 2 wrong each
        for j in range(4):
            ans = i + 1 + (j % 2)  # j odd: a wrong answer
            rows.append(dict(prompt=f"Q: {i}+1=?\n", response=f"{i}+1={ans}\n#### {ans}",
                             reward=float(j % 2 == 0)))
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    return tok, policy, exs


def test_dpo_pairs_at_most_12_a_prompt(setup):
    _, _, exs = setup
    pairs = algos.make("dpo").items(exs)
    assert len(pairs) == 8 * 4  # 2 good x 2 bad a prompt, under the cap
    assert all(c.rewards[-1] > 0 >= r.rewards[-1] and c.prompt == r.prompt for c, r in pairs)
    many = exs + [e for e in exs if e.rewards[-1] > 0] * 3  # 8 good x 2 bad = 16 > 12
    assert max(sum(1 for c, _ in algos.make("dpo").items(many) if c.prompt == p)
               for p in {e.prompt for e in exs}) == 12
    assert all(e.rewards[-1] > 0 for e in algos.make("rs").items(exs))


@pytest.mark.parametrize("algo", algos.ALGOS)
def test_every_algorithm_trains(setup, algo, tmp_path):
    tok, policy0, exs = setup
    policy = build_policy(policy0.config)
    policy.load_state_dict(policy0.state_dict())
    value = ValueModel.from_policy(policy) if algos.make(algo).needs_value else None
    args = TrainConfig(algo=algo, out=str(tmp_path), lr=3e-3, value_lr=1e-2, batch_size=8,
                     micro_batch=4, max_steps=10, engine="torch", progress=False, seed=1)
    train(args, tok, policy, value, exs)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 10 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]), sum(r["loss"] for r in rows[-3:])
    assert last < first, (algo, [round(r["loss"], 4) for r in rows])


def test_sft_trains_on_canonical_solutions_never_on_samples(tmp_path):
    sampled = [dict(prompt="Q1", response="wrong", reward=0.0, _source="d:1"),
               dict(prompt="Q1", response="right", reward=1.0, _source="d:2")]
    with pytest.raises(D.DataError, match=r"d.jsonl: no row has a 'solution': --algo sft "
                                          r"trains on canonical solutions"):
        D.sft_rows(sampled, "d.jsonl")
    with_solutions = [dict(r, solution="1+1=2\n#### 2") for r in sampled] + [
        dict(prompt="Q2", response="x", reward=0.0, solution="#### 5")]
    rows = D.sft_rows(with_solutions, "d.jsonl")
    assert [(r["prompt"], r["response"], r["reward"]) for r in rows] == [
        ("Q1", "1+1=2\n#### 2", 1.0), ("Q2", "#### 5", 1.0)]  # once a prompt
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "Q", "solution": "#### 1"}\n{"prompt": "Q3"}\n')
    with pytest.raises(D.DataError, match=rf"{f}:2: expected an object with string 'prompt' "
                                          r"and 'solution'"):
        D.read_solutions(f)


def test_sampling_carries_a_prompts_solution_into_its_rows():
    from dqo.generation import Sample, label_samples
    s = Sample("#### 2", [3, 2], [-0.1, -0.2])
    rows = label_samples(["Q1", "Q2"], ["2", "3"], [[s], [s]], lambda t, a: [True] * len(t),
                         solutions=["1+1=2\n#### 2", None])
    assert rows[0]["solution"] == "1+1=2\n#### 2" and "solution" not in rows[1]


def test_dro_logs_its_objective_once(setup, tmp_path):
    """DRO's one objective is both its policy and its value loss: the logged loss is it, not
    their sum."""
    tok, policy0, exs = setup
    policy = build_policy(policy0.config)
    policy.load_state_dict(policy0.state_dict())
    args = TrainConfig(algo="dro", out=str(tmp_path), lr=1e-3, value_lr=1e-2, batch_size=8,
                       micro_batch=8, max_steps=2, engine="torch", progress=False)
    train(args, tok, policy, ValueModel.from_policy(policy), exs)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    for r in rows:
        assert r["loss"] == pytest.approx(r["policy_loss"]) == pytest.approx(r["value_loss"])


def test_dro_scores_a_cut_response_as_terminal_with_its_reward():
    """DRO's critic is fit at the prompt alone: a cut response's sequence reward is its reward,
    never V of the state after it (a value the critic is not trained on; here 5)."""
    class Engine:
        def __init__(self, out):
            self.out, self.losses = out, []

        def __call__(self, *args, with_after=False, **kwargs):
            return (self.out, torch.full_like(self.out, 5.0)) if with_after else self.out

        def backward(self, loss):
            self.losses.append(loss.item())

        def step(self):
            pass

    exs = [D.Example([1, 2], [3, 4], [0.0, 0.5], finished=False),
           D.Example([1, 2], [3, 4], [0.0, 1.0])]
    for e in exs:
        e.ref_logp = [-1.0, -1.0]
    b = D.collate(exs, pad_id=0)
    logp = torch.where(b.action_mask, torch.tensor(-0.5), torch.tensor(0.0))
    values = torch.full(b.input_ids.shape, 0.25)
    engines = {"policy": Engine(logp.requires_grad_()), "value": Engine(values.requires_grad_())}
    stats = algos.make("dro", TrainConfig(algo="dro", beta=0.5)).step(engines, b, None)
    # lr(y) = 2 x (-0.5 + 1) = 1 for both; r = 0.5 (cut) and 1.0
    expect = sum(0.5 * (0.5 * 1.0 + 0.25 - r) ** 2 for r in (0.5, 1.0)) / 2
    assert stats["loss"] == pytest.approx(expect)
    assert engines["value"].losses == [pytest.approx(expect)]
