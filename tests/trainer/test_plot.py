"""python -m dqo.plot: training curves from metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

from dqo.plot import figure, plot_run, read_metrics, run_name

ROOT = Path(__file__).resolve().parents[2]


def test_curves_from_metrics(tmp_path):
    rows = [dict(step=s, loss=1.0 / s, policy_loss=0.6 / s, value_loss=0.4 / s, kl=0.01 * s,
                 is_ess=1.0 - 0.01 * s, is_weight_clip_frac=0.02 * s,
                 value_explained_var=0.1 * s, skipped=s == 5)
            for s in range(1, 9)]
    rows[3]["eval_greedy"], rows[7]["eval_greedy"] = 0.3, 0.4
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 9, "lo'  # a cut last line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 8
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 20_000


def test_curves_a_person_can_read(tmp_path):
    rows = [dict(step=0, eval_greedy=0.2)] + [
        dict(step=s, loss=1.0, policy_loss=0.01, value_loss=0.9, kl=0.01 * s, lr=1e-5,
             return_mean=0.5, response_length=20.0 + s, policy_grad_norm=0.1,
             value_grad_norm=2.0, **({"eval_greedy": 0.5} if s == 4 else {}))
        for s in range(1, 5)]
    fig = figure(rows, "my-run")
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    # policy and value losses apart (their scales differ), the single loss only without them
    assert {"policy loss", "value loss"} <= set(axes) and "loss" not in axes
    for title in ("KL to the reference", "return", "response length", "learning rate",
                  "gradient norm (before clipping)", "evaluation accuracy"):
        assert title in axes, title
    assert all(ax.get_ylabel() and ax.get_xlabel() == "optimizer step" for ax in axes.values())
    assert "k3" in axes["KL to the reference"].get_ylabel()
    (line,) = axes["evaluation accuracy"].get_lines()
    assert list(line.get_xdata()) == [0, 4]  # the evaluation before training is its first point
    assert fig._suptitle.get_text() == "my-run"
    # a run's title is its name, with what its config.yaml says it ran: not a raw path
    run = tmp_path / "deep" / "gsm8k-dqo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("algo: dqo\nmodel: /models/Qwen2.5-0.5B\n")
    assert run_name(run) == "gsm8k-dqo: DQO on Qwen2.5-0.5B"
    assert "loss" in {ax.get_title() for ax in figure([dict(step=1, loss=0.3)], "x").axes}


def test_plot_cli_names_a_missing_file(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dqo.plot", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr


def test_tensorboard_gets_every_metric(tmp_path):
    import pytest
    pytest.importorskip("tensorboard")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dqo.configs import TrainConfig
    from dqo.data import check_row, tokenize_row
    from dqo.loop import train
    from dqo.modeling import ValueModel, build_policy, tiny_config
    from dqo.reference_logps import compute_ref_logps
    from dqo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    exs = [tokenize_row(check_row(dict(prompt="Q: 1+1=?\n", response=r, reward=float(i % 2)),
                                  "x"), tok) for i, r in enumerate(["#### 2", "#### 3"] * 4)]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    args = TrainConfig(out=str(tmp_path), lr=1e-3, batch_size=4, micro_batch=4, max_steps=2,
                     engine="torch", progress=False, report_to="tensorboard")
    train(args, tok, policy, ValueModel.from_policy(policy), exs)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the gradient norms and the response length are logged every step (the curves show them)
    assert all(r["policy_grad_norm"] > 0 and r["value_grad_norm"] > 0 for r in rows)
    assert all(r["response_length"] == 7 for r in rows)  # "#### 2" (6 characters) + EOS
    assert all(r["kl"] >= 0 for r in rows)
    for key in ("loss", "kl", "is_ess", "value_explained_var", "lr"):
        events = acc.Scalars(f"train/{key}")  # grouped as TRL's trainers write them
        assert [e.step for e in events] == [1, 2]
        for e, row in zip(events, rows):
            assert abs(e.value - row[key]) <= 1e-6 * max(1.0, abs(row[key])), key
    # the run's options in the hparams plugin, in this run's own events file
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["lr"].number_value == 1e-3 and info.hparams["algo"].string_value == "dqo"


def test_tracker_tags_are_grouped():
    from dqo.tracking import Tracker

    class Spy(Tracker):
        def _log(self, values, step):
            self.seen = values

    t = Spy()
    t.log({"step": 3, "loss": 1.0, "eval_greedy": 0.5, "before_greedy": 0.4, "tag": "x"}, 3)
    assert t.seen == {"train/loss": 1.0, "eval/greedy": 0.5, "eval/before_greedy": 0.4}
