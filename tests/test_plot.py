"""python -m dqo.plot: training curves from metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

from dqo.plot import plot_run, read_metrics

ROOT = Path(__file__).resolve().parent.parent


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
