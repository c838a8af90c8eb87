"""Training curves of a run, from its ``metrics.jsonl``.

    python -m dqo.plot RUN_DIR          # writes RUN_DIR/curves.png

One panel a quantity, against the optimizer step: the losses, the KL estimate (mean log-ratio
to the reference), the importance weights' effective sample size and the share of them at the
cap, the value model's explained variance, and evaluation accuracy where the run evaluated
(``--eval-every``). Steps whose update was skipped (a non-finite gradient) are marked.
``dqo.train`` writes the picture at the end of every run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

# (title, [(metrics key, label)]); a panel is drawn when one of its keys is in the run
PANELS = [
    ("loss", [("loss", "total"), ("policy_loss", "policy"), ("value_loss", "value")]),
    ("KL to the reference (mean log-ratio)", [("kl", "kl")]),
    ("importance weights", [("is_ess", "effective sample size"),
                            ("is_weight_clip_frac", "share at the cap")]),
    ("value model", [("value_explained_var", "explained variance")]),
    ("evaluation accuracy", [("eval_greedy", "greedy"), ("eval_sampled", "sampled")]),
]


def read_metrics(path: Path) -> List[Dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a cut last line: the run was killed mid-write
            continue
    return rows


def plot_run(run_dir, out: Optional[Path] = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/curves.png``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no metrics rows to plot")
    panels = [(t, [(k, lab) for k, lab in keys if any(k in r for r in rows)])
              for t, keys in PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, label in keys:
            pts = [(r["step"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=label)
        for s in skipped:
            ax.axvline(s, color="red", alpha=0.3, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1 or keys[0][0].startswith("eval_"):  # greedy or sampled: say which
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir}" + (f" ({len(skipped)} skipped steps, red)" if skipped else ""))
    fig.tight_layout()
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
