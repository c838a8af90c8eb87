"""Baselines on the same offline samples: loss functions and a few training steps each."""
import json
import math

import pytest
import torch

from dqo import algos
from dqo import data as D
from dqo.losses import dpo_loss, kto_loss, sequence_sum
from dqo.modeling import ValueModel, build_policy, tiny_config
from dqo.reference_logps import compute_ref_logps
from dqo.tokenizer import char_tokenizer
from dqo.train import TrainArgs, train


def test_dpo_loss_closed_form():
    c, r = torch.tensor([-3.0, -1.0], requires_grad=True), torch.tensor([-2.0, -4.0])
    cr, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-2.0, -3.0])
    loss = dpo_loss(c, r, cr, rr, beta=0.5)
    margins = torch.tensor([(-3 + 2.5) - (-2 + 2.0), (-1 + 2.0) - (-4 + 3.0)])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.5 * margins).mean())
    loss.backward()
    assert (c.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_kto_loss_directions():
    logp = torch.tensor([-1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    loss = kto_loss(logp, ref, torch.tensor([True, False]), beta=1.0)
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1]  # push desirable up, undesirable down
    z = 1.0  # mean log-ratio, clamped at 0
    exp = ((1 - torch.sigmoid(torch.tensor(1.0 - z)))
           + (1 - torch.sigmoid(torch.tensor(z - 1.0)))) / 2
    torch.testing.assert_close(loss, exp)


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
    pairs = algos.items("dpo", exs)
    assert len(pairs) == 8 * 4  # 2 good x 2 bad a prompt, under the cap
    assert all(c.rewards[-1] > 0 >= r.rewards[-1] and c.prompt == r.prompt for c, r in pairs)
    many = exs + [e for e in exs if e.rewards[-1] > 0] * 3  # 8 good x 2 bad = 16 > 12
    assert max(sum(1 for c, _ in algos.items("dpo", many) if c.prompt == p)
               for p in {e.prompt for e in exs}) == 12
    assert all(e.rewards[-1] > 0 for e in algos.items("rs", exs))


@pytest.mark.parametrize("algo", algos.ALGOS)
def test_every_algorithm_trains(setup, algo, tmp_path):
    tok, policy0, exs = setup
    policy = build_policy(policy0.config)
    policy.load_state_dict(policy0.state_dict())
    value = ValueModel.from_policy(policy) if algo in algos.NEEDS_VALUE else None
    args = TrainArgs(algo=algo, out=str(tmp_path), lr=3e-3, value_lr=1e-2, batch_size=8,
                     micro_batch=4, max_steps=10, engine="torch", progress=False, seed=1)
    train(args, tok, policy, value, exs)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 10 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = sum(r["loss"] for r in rows[:3]), sum(r["loss"] for r in rows[-3:])
    assert last < first, (algo, [round(r["loss"], 4) for r in rows])
