"""Every option declared once (dqo.configs): help on every flag, --config YAML with overrides,
out-of-range values refused before any work wherever they come from, the defaults shown being
the defaults used, and the Trainer path taking the same loss options."""
import dataclasses
import math

import pytest
import torch

import dqo.train as train_cli
from dqo.cli import option_parser, parse_config, write_config
from dqo.configs import (
    EMBEDDED_DEFAULT,
    EVAL_SECTIONS,
    PLAN_SECTIONS,
    SAMPLE_SECTIONS,
    TRAIN_SECTIONS,
    DQOLossConfig,
    EvalConfig,
    SampleConfig,
    TrainConfig,
)
from dqo.errors import UsageError
from dqo.options import to_dict

COMMANDS = {"train": TRAIN_SECTIONS, "sample": SAMPLE_SECTIONS, "evaluate": EVAL_SECTIONS,
            "memory": PLAN_SECTIONS}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command):
    p = option_parser(COMMANDS[command], prog=command)
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 10
    for a in flags:
        text = (a.help or "").split("(default:")[0].strip()
        assert len(text) > 5, (command, a.option_strings, a.help)
        assert all("_" not in s for s in a.option_strings), a.option_strings  # one spelling


def test_every_field_has_help_and_one_section():
    for cls in {*TRAIN_SECTIONS, *SAMPLE_SECTIONS, *EVAL_SECTIONS, *PLAN_SECTIONS}:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
    names = [f.name for cls in TRAIN_SECTIONS for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(dataclasses.fields(TrainConfig))


def test_help_shows_the_defaults_used(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR learning rate of the policy (default: 5e-07)" in text
    for k, v in EMBEDDED_DEFAULT.items():  # the preset is named with its values
        assert f"--{k.replace('_', '-')} {v}" in text
    embedded = train_cli.parse_args([])
    assert all(getattr(embedded, k) == v for k, v in EMBEDDED_DEFAULT.items())
    (tmp_path / "d.jsonl").touch()
    real = train_cli.parse_args(["--model", "org/m", "--data", str(tmp_path / "d.jsonl")])
    for f in dataclasses.fields(TrainConfig):  # with --data: exactly the shown defaults
        if f.name not in ("model", "data"):
            assert getattr(real, f.name) == f.default, f.name


def test_config_file_with_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    # 1e-5 is a string to YAML 1.1; is-policy in the flag's spelling
    cfg.write_text("lam: 0.9\nis_clip: .inf\nlr: 1e-5\nalgo: dro\nis-policy: false\n"
                   "max_steps: 7\nout: somewhere\n")
    a = train_cli.parse_args(["--config", str(cfg), "--lam", "0.5", "--out", str(tmp_path)])
    assert (a.lam, a.is_clip, a.lr, a.algo, a.is_policy, a.max_steps, a.out) == (
        0.5, math.inf, 1e-5, "dro", False, 7, str(tmp_path))
    assert a.value_lr == EMBEDDED_DEFAULT["value_lr"]  # no --data: the preset under the file


def test_resolved_config_reads_back(tmp_path):
    (tmp_path / "d.jsonl").touch()
    a = train_cli.parse_args(["--model", "org/m", "--data", str(tmp_path / "d.jsonl"),
                              "--is-clip", "inf", "--no-is-value", "--top-k", "4"])
    write_config(a, tmp_path / "config.yaml")
    assert train_cli.parse_args(["--config", str(tmp_path / "config.yaml")]) == a


@pytest.mark.parametrize("yaml_text, argv, message", [
    ("lam: 2\n", [], "--lam: expected a value in [0, 1], got 2"),
    ("", ["--beta", "-1"], "--beta: expected a value in (0, inf), got -1.0"),
    ("beta: 0.2\n", ["--is-clip", "0.5"], "--is-clip: expected a value in [1, inf], got 0.5"),
    ("micro_batch: 0\n", [], "--micro-batch: expected an integer in [1, inf), got 0"),
    ("epochs: 1.5\n", [], "--epochs: expected an integer"),
    ("lam: high\n", [], "--lam: expected a number, got 'high'"),
    ("loss_agg: mean\n", [], "--loss-agg: expected one of token-mean"),
    ("top_k: -1\n", [], "--top-k: expected an integer >= 0"),
    ("lamda: 0.5\n", [], "unknown option 'lamda'"),
    ("- lam\n", [], "expected a mapping of options"),
])
def test_out_of_range_refused_before_any_work(tmp_path, monkeypatch, capsys, yaml_text, argv,
                                              message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(train_cli, "run_default", no_work)
    monkeypatch.setattr(train_cli, "run_custom", no_work)
    monkeypatch.setattr(train_cli, "fit_threads", no_work)
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--config", str(cfg), "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "python -m dqo.train: error: " in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_the_api_checks_as_the_command_line_does():
    with pytest.raises(UsageError, match=r"--lam: expected a value in \[0, 1\], got 2"):
        DQOLossConfig(lam=2)
    with pytest.raises(UsageError, match="--batch-size: expected a multiple of --micro-batch"):
        TrainConfig(batch_size=6, micro_batch=4)
    with pytest.raises(UsageError, match="--sft-data: only --algo sft"):
        TrainConfig(sft_data="s.jsonl")
    assert TrainConfig(beta=0.3, target_grad=True).loss == DQOLossConfig(beta=0.3,
                                                                          target_grad=True)


def test_sample_and_evaluate_configs(tmp_path):
    with pytest.raises(UsageError, match="--model: required"):
        parse_config(SampleConfig, SAMPLE_SECTIONS, ["--prompts", "p", "--out", "o"], prog="s")
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model: m\ndata: d\ntop_p: 0.5\n")
    e = parse_config(EvalConfig, EVAL_SECTIONS, ["--config", str(cfg), "--samples", "0",
                                                  "--generation-batch-size", "3"], prog="e")
    assert (e.model, e.data, e.samples, e.generation_batch_size) == ("m", "d", 0, 3)
    assert e.decoding_config().top_p == 0.5 and e.decoding_config().top_k == 16
    with pytest.raises(UsageError, match=r"--top-p: expected a value in \(0, 1\]"):
        parse_config(EvalConfig, EVAL_SECTIONS, ["--model", "m", "--data", "d", "--top-p", "2"],
                     prog="e")


def _tiny_trainer(tmp_path, **options):
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from dqo.hf import DQOTrainer, PolicyWithValue
    from dqo.modeling import ValueModel
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-4)
    rows = [dict(input_ids=[5, 6, 7, 8, 9], prompt_length=2, reward=1.0, ref_logp=[-4.0] * 3,
                 behavior_logp=[-4.1] * 3)] * 2
    return DQOTrainer(model=PolicyWithValue(policy, ValueModel.from_policy(policy)), args=args,
                      train_dataset=rows, **options)


def test_trainer_takes_every_loss_option(tmp_path, monkeypatch):
    import dqo.hf as hf
    import dqo.hf.trainer as hf_trainer
    options = dict(beta=0.2, lam=0.9, gamma=0.95, is_clip=2.0, is_policy=False, is_value=False,
                   target_grad=True, loss_agg="seq-mean-token-sum")
    assert set(options) == {f.name for f in dataclasses.fields(DQOLossConfig)}
    trainer = _tiny_trainer(tmp_path, **options)
    trainer.data_collator = hf.DQOCollator(0)
    seen = {}
    real = hf_trainer.fused_dqo_loss

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(hf_trainer, "fused_dqo_loss", spy)
    batch = trainer.data_collator(list(trainer.train_dataset))
    trainer.compute_loss(trainer.model, batch)
    assert {k: seen[k] for k in options} == options
    assert to_dict(trainer.loss_config) == options
    with pytest.raises(UsageError, match=r"--lam: expected a value in \[0, 1\]"):
        _tiny_trainer(tmp_path, lam=2.0)
    with pytest.raises(TypeError, match="not both"):
        _tiny_trainer(tmp_path, loss=DQOLossConfig(), beta=0.1)


def test_trainer_value_lr(tmp_path):
    trainer = _tiny_trainer(tmp_path, value_lr=1e-2)
    opt = trainer.create_optimizer()
    value_ids = {id(p) for p in trainer.model.value.parameters()}
    lrs = {(id(p) in value_ids): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {True: 1e-2, False: 1e-4}
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        1 for p in trainer.model.parameters() if p.requires_grad)


def test_a_run_records_its_resolved_config_at_start(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").touch()
    out = tmp_path / "run"
    seen = {}

    def stub(args):  # the work itself is tested elsewhere; the file must exist before it
        seen["config_there"] = (out / "config.yaml").is_file()
        return {"before": {}, "after": {}}

    monkeypatch.setattr(train_cli, "run_custom", stub)
    monkeypatch.setattr(train_cli, "fit_threads", lambda *a, **k: 1)
    argv = ["--model", "org/m", "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
            "--lam", "0.8", "--no-progress"]
    train_cli.main(argv)
    assert seen == {"config_there": True}
    again = train_cli.parse_args(["--config", str(out / "config.yaml")])
    assert again == train_cli.parse_args(argv) and again.lam == 0.8 and not again.progress
