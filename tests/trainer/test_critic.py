"""The critic learns by default: a learning rate of its own (a multiple of the policy's), a
head that starts at the data's mean return, and a warning when it explains nothing."""
import logging

import pytest
import torch

from dqo import data as D
from dqo import loop
from dqo.configs import VALUE_LR_RATIO, TrainConfig
from dqo.critic import ExplainedVarianceWatch, mean_return
from dqo.modeling import ValueModel
from dqo.runs import prepare_models


def examples(tok, rewards):
    return [D.tokenize_row(D.check_row({"prompt": "Q: 1+1=?\n", "response": "#### 2",
                                        "reward": r}, "x"), tok) for r in rewards]


def test_value_lr_defaults_to_a_multiple_of_the_policy_lr():
    assert VALUE_LR_RATIO > 1
    assert TrainConfig(lr=5e-7).value_learning_rate == pytest.approx(5e-7 * VALUE_LR_RATIO)
    assert TrainConfig(lr=5e-7, value_lr_ratio=3).value_learning_rate == pytest.approx(1.5e-6)
    assert TrainConfig(lr=5e-7, value_lr=1e-4).value_learning_rate == 1e-4  # given: as is


def test_the_loop_builds_the_value_engine_at_the_value_lr(tok, policy, tmp_path, monkeypatch):
    lrs = {}
    real = loop.make_engine

    def spy(module, cfg, *a, **k):
        lrs["value" if isinstance(module, ValueModel) else "policy"] = cfg.lr
        return real(module, cfg, *a, **k)

    monkeypatch.setattr(loop, "make_engine", spy)
    args = TrainConfig(out=str(tmp_path / "run"), lr=1e-4, value_lr_ratio=20, batch_size=4,
                       micro_batch=4, max_steps=1, engine="torch", progress=False,
                       save_every=0)
    exs = examples(tok, [1.0, 0.0, 1.0, 0.0])
    for e in exs:
        e.ref_logp = [0.0] * len(e.response_ids)
    loop.train(args, tok, policy, ValueModel.from_policy(policy), exs)
    assert lrs == {"policy": 1e-4, "value": pytest.approx(2e-3)}


def test_mean_return_discounts_every_reward_from_the_first_token():
    class E:
        def __init__(self, rewards):
            self.rewards = rewards
    assert mean_return([E([0.0, 0.0, 1.0]), E([0.5, 0.0, 0.0])], gamma=0.5) == \
        pytest.approx((0.25 + 0.5) / 2)
    assert mean_return([E([0.0, 1.0]), E([0.0, 0.0])]) == 0.5


@pytest.mark.parametrize("init,start", [("mean-return", 0.75), ("zero", 0.0)])
def test_the_value_head_starts_at_the_mean_return(tok, policy, init, start):
    exs = examples(tok, [1.0, 1.0, 1.0, 0.0])
    args = TrainConfig(algo="dqo", value_init=init, gradient_checkpointing=False)
    _, value = prepare_models(args, policy, examples=exs)
    ids = torch.tensor([exs[0].prompt_ids + exs[0].response_ids])
    v = value(ids, torch.ones_like(ids))
    assert torch.allclose(v[:, 1:], torch.full_like(v[:, 1:], start))


def test_a_value_model_from_disk_keeps_its_head(tok, policy, tmp_path):
    saved = ValueModel.from_policy(policy)
    torch.nn.init.constant_(saved.head.bias, -3.0)
    saved.save_pretrained(tmp_path / "v")
    exs = examples(tok, [1.0, 1.0])
    _, value = prepare_models(TrainConfig(algo="dqo", gradient_checkpointing=False), policy,
                              str(tmp_path / "v"), exs)
    assert value.head.bias.item() == -3.0


def test_a_critic_that_explains_nothing_is_warned_about_once(caplog):
    watch = ExplainedVarianceWatch(total_steps=400)
    assert watch.after == 50
    assert ExplainedVarianceWatch(total_steps=40).after == 10  # a quarter of a short run
    with caplog.at_level(logging.WARNING, logger="dqo.train"):
        fired = [watch({"step": s, "value_explained_var": 0.01}) for s in range(1, 101)]
    assert fired.index(True) == 49 and sum(fired) == 1
    assert len([r for r in caplog.records if "explains" in r.getMessage()]) == 1


def test_a_critic_that_learns_is_not_warned_about(caplog):
    watch = ExplainedVarianceWatch(total_steps=40)
    with caplog.at_level(logging.WARNING, logger="dqo.train"):
        # near 0 early, learning by the check; a NaN (constant returns) is not a zero
        fired = [watch({"step": s, "value_explained_var": ev})
                 for s, ev in enumerate([0.0] * 5 + [float("nan")] + [0.4] * 34, 1)]
    assert not any(fired) and not caplog.records
