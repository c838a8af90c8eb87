"""Training curves of a run, from its ``metrics.jsonl``.

    python -m dqo.plot RUN_DIR          # writes RUN_DIR/curves.png

One panel a quantity, against the optimizer step, each with its y-axis label and unit: the
policy and the value loss (separate panels: their scales differ by orders of magnitude), the
KL to the reference (the non-negative k3 estimate, ``kl``), the mean return and value, the mean
response length, the learning rate, the gradient norms, the importance weights' effective
sample size and the share of them at the cap, the value model's explained variance, and
evaluation accuracy where the run evaluated (its step-0 point: the evaluation before
training). Steps whose update was skipped (a non-finite gradient) are marked. The title is the
run's name (its directory's, with the algorithm and model of its ``config.yaml``).
``dqo.train`` writes the picture at the end of every run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# (title, y-axis label, [(metrics key, legend label)]); a panel is drawn when one of its keys
# is in the run
PANELS: List[Tuple[str, str, List[Tuple[str, str]]]] = [
    ("loss", "loss", [("loss", "total")]),  # algorithms with one loss (DPO, KTO, SFT, RS)
    ("policy loss", "loss (per token)", [("policy_loss", "policy")]),
    ("value loss", "loss (per token)", [("value_loss", "value")]),
    ("KL to the reference", "nats per token (k3 estimate)", [("kl", "kl")]),
    ("return", "reward units", [("return_mean", "mean return G_t"),
                                ("value_mean", "mean value V_t")]),
    ("response length", "tokens", [("response_length", "mean")]),
    ("learning rate", "learning rate", [("lr", "policy")]),
    ("gradient norm (before clipping)", "L2 norm", [("policy_grad_norm", "policy"),
                                                    ("value_grad_norm", "value")]),
    ("importance weights", "share (0 to 1)", [("is_ess", "effective sample size"),
                                              ("is_weight_clip_frac", "share at the cap")]),
    ("value model", "explained variance", [("value_explained_var", "explained variance")]),
    ("evaluation accuracy", "accuracy (share correct)", [("eval_greedy", "greedy"),
                                                         ("eval_sampled", "sampled")]),
]
SHARES = ("importance weights", "evaluation accuracy")  # quantities in [0, 1]


def read_metrics(path: Path) -> List[Dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a cut last line: the run was killed mid-write
            continue
    return rows


def points(rows: List[Dict], key: str) -> List[Tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]


def panels(rows: List[Dict]) -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """The panels of :data:`PANELS` that ``rows`` have points for (the single ``loss`` only
    when the run has no separate policy loss)."""
    out = []
    for title, ylabel, keys in PANELS:
        if title == "loss" and any("policy_loss" in r for r in rows):
            continue
        keys = [(k, lab) for k, lab in keys if points(rows, k)]
        if keys:
            out.append((title, ylabel, keys))
    return out


def run_name(run_dir: Path) -> str:
    """The run's directory name, with the algorithm and model its ``config.yaml`` names."""
    name = Path(run_dir).resolve().name
    try:
        import yaml
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except Exception:  # no config (metrics copied elsewhere): the name alone
        return name
    algo = str(cfg.get("algo", "")).upper()
    model = Path(str(cfg["model"])).name if cfg.get("model") else "embedded default"
    return f"{name}: {algo} on {model}" if algo else name


def figure(rows: List[Dict], title: str):
    """The matplotlib figure of ``rows`` (one panel each of :func:`panels`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(rows)
    if not chosen:
        raise ValueError("no metric to plot")
    cols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.3 * nrows), squeeze=False)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for ax, (name, ylabel, keys) in zip(axes.flat, chosen):
        for key, label in keys:
            pts = points(rows, key)
            ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=label)
        for s in skipped:
            ax.axvline(s, color="red", alpha=0.3, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if name in SHARES:
            ax.set_ylim(-0.03, 1.03)
        if len(keys) > 1 or name == "evaluation accuracy":  # greedy or sampled: say which
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(title + (f" ({len(skipped)} skipped steps, red)" if skipped else ""))
    fig.tight_layout()
    return fig


def plot_run(run_dir, out: Optional[Path] = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``)."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no metrics rows to plot")
    fig = figure(rows, run_name(run_dir))
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", help="a dqo.train --out directory (holds metrics.jsonl)")
    p.add_argument("--out", help="the picture (default: RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    metrics = Path(args.run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        print(f"python -m dqo.plot: error: no such file: {metrics}", file=sys.stderr)
        raise SystemExit(2)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
