"""DeepSpeed as users configure it: a user's JSON merged over the trainer's config, offload,
explicit precision, and ZeRO-3 saving without the whole model on every rank."""
import json

import pytest
import torch
from test_loop import partition_every_parameter, small_setup, train_args

from dqo.configs import TrainConfig
from dqo.engine import deepspeed_config, merge_config, read_user_config
from dqo.errors import UsageError
from dqo.loop import train
from dqo.modeling import ValueModel


def test_a_users_keys_win_and_auto_keeps_ours():
    from dqo.engine import OptimConfig
    ours = deepspeed_config(OptimConfig(lr=1e-5, micro_batch=4, grad_accum=2), 2, "bf16")
    theirs = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5,
              "zero_optimization": {"stage": 3, "overlap_comm": True},
              "optimizer": {"params": {"lr": "auto", "torch_adam": False}},
              "activation_checkpointing": {"partition_activations": True}}
    merged, changes = merge_config(ours, theirs)
    assert merged["train_micro_batch_size_per_gpu"] == 4  # "auto": the trainer's
    assert merged["gradient_clipping"] == 0.5
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert merged["optimizer"]["params"]["lr"] == 1e-5
    assert merged["optimizer"]["params"]["torch_adam"] is False
    assert merged["optimizer"]["params"]["betas"] == [0.9, 0.95]  # untouched siblings stay
    assert merged["bf16"] == ours["bf16"]
    assert "gradient_clipping: 1.0 -> 0.5" in changes
    assert "zero_optimization.stage: 2 -> 3" in changes
    assert "zero_optimization.overlap_comm: true (added)" in changes
    assert not any(c.startswith("train_micro_batch") for c in changes)
    assert ours["zero_optimization"]["stage"] == 2  # ours is not modified


@pytest.mark.parametrize("precision,bf16,fp16", [("bf16", True, False), ("fp16", False, True),
                                                 ("fp32", False, False)])
def test_precision_and_offload_sections(precision, bf16, fp16):
    from dqo.engine import OptimConfig
    cfg = deepspeed_config(OptimConfig(), 3, precision, "all")
    assert cfg["bf16"]["enabled"] is bf16 and cfg["fp16"]["enabled"] is fp16
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_config(OptimConfig(), 2, precision,
                                                   "optimizer")["zero_optimization"]


def test_bad_user_configs_are_named(tmp_path):
    with pytest.raises(UsageError, match="--deepspeed: cannot read"):
        read_user_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{zero: 2")
    with pytest.raises(UsageError, match="bad.json is not JSON"):
        read_user_config(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        read_user_config(str(tmp_path / "list.json"))


@pytest.mark.parametrize("kw,match", [
    (dict(offload="all", zero_stage=2), "--offload all: .* --zero-stage 3"),
    (dict(bf16=True, fp16=True), "--fp16: expected at most one"),
    (dict(engine="torch", deepspeed="ds.json"), "--deepspeed: needs the DeepSpeed engine"),
    (dict(engine="torch", offload="optimizer"), "--offload: needs the DeepSpeed engine"),
])
def test_option_conflicts_are_refused(kw, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig(**kw)


def test_a_users_config_and_offload_run_on_cpu(tok, policy, tmp_path, caplog):
    pytest.importorskip("deepspeed")
    import dqo.engine as E
    exs = small_setup(tok, policy)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.25, "train_micro_batch_size_per_gpu":
                                "auto", "zero_optimization": {"reduce_bucket_size": 1000000}}))
    seen = []
    real_init = E.DeepSpeedEngine.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(self.config)

    E.DeepSpeedEngine.__init__ = spy
    try:
        args = train_args(tmp_path, engine="deepspeed", zero_stage=2, offload="optimizer",
                          deepspeed=str(user), max_steps=2, packing=True)
        with caplog.at_level("INFO", logger="dqo.engine"):
            train(args, tok, policy, ValueModel.from_policy(policy), exs)
    finally:
        E.DeepSpeedEngine.__init__ = real_init
    assert len(seen) == 2  # policy and value
    for cfg in seen:
        assert cfg["gradient_clipping"] == 0.25
        assert cfg["train_micro_batch_size_per_gpu"] == 4
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000000
    assert "gradient_clipping: 1.0 -> 0.25" in caplog.text
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_zero3_final_models_load_whole(tok, policy, tmp_path, monkeypatch):
    """ZeRO-3 saves from a layer-by-layer gather into rank 0's memory: final/ holds every
    weight, the trained ones (a save of the partitioned placeholders would not load)."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    partition_every_parameter(monkeypatch)
    import deepspeed
    gathered = []  # the parameters of each gather: one layer's, never the whole model's
    real_gather = deepspeed.zero.GatheredParameters

    def counting(params, *a, **k):
        gathered.append(len(list(params)) if not isinstance(params, torch.nn.Parameter) else 1)
        return real_gather(params, *a, **k)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)
    exs = small_setup(tok, policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    args = train_args(tmp_path, engine="deepspeed", zero_stage=3, max_steps=2, lr=1e-2)
    train(args, tok, policy, ValueModel.from_policy(policy), exs)
    n_params = len(list(policy.parameters()))
    assert gathered and max(gathered) < n_params / 2, (max(gathered), n_params)
    final = tmp_path / "run" / "final"
    loaded, info = AutoModelForCausalLM.from_pretrained(final / "policy",
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    after = loaded.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in before)  # trained weights
    value = ValueModel.from_pretrained(final / "value")
    assert value.head.weight.abs().sum() > 0  # the trained head, not the zero init


def test_a_second_deepspeed_run_after_the_process_group_closed(tok, policy, tmp_path):
    """python -m dqo.train closes the process group at its end; a second DeepSpeed run in the
    same process (a notebook, a sweep) must not trip over DeepSpeed's stale world-group clone."""
    pytest.importorskip("deepspeed")
    from dqo.engine import leave_process_group
    exs = small_setup(tok, policy)
    for run in ("first", "second"):
        train(train_args(tmp_path / run, engine="deepspeed", zero_stage=2, max_steps=1), tok,
              policy, ValueModel.from_policy(policy), exs)
        leave_process_group()
    assert (tmp_path / "second" / "run" / "metrics.jsonl").is_file()
