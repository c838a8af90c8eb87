"""python -m dqo.plot: training curves from metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

from dqo.plot import plot_run, read_metrics

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
    for key in ("loss", "kl", "is_ess", "value_explained_var", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        for e, row in zip(events, rows):
            assert abs(e.value - row[key]) <= 1e-6 * max(1.0, abs(row[key])), key
