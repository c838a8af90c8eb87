"""The results of a benchmark run: a JSON of every row, the markdown tables (ours against the
strongest peer of each op, then every implementation) and the plot; ``run.py --render`` redoes
the tables and the plot of a JSON."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict

import torch
from cases import OPS
from peers import installed

import dqo_kernels


def strongest_peers(rows) -> Dict:
    """(op, shape) -> (our row, the fastest peer's row) wherever a peer ran."""
    out = {}
    for r in rows:
        if r["impl"] != "ours":
            continue
        peers = [p for p in rows if p["op"] == r["op"] and p["shape"] == r["shape"]
                 and p["impl"] != "ours" and not p.get("failed")]
        if peers:
            out[(r["op"], tuple(r["shape"]))] = (r, min(peers, key=lambda p: p["ms"]))
    return out


def plot(rows, out_png: Path, dev_name: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (i != "ours", i))
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(2, len(ops), figsize=(4.5 * len(ops), 7), squeeze=False)
    for j, op in enumerate(ops):
        rs = [r for r in rows if r["op"] == op and not r.get("failed")]
        for impl in sorted({r["impl"] for r in rs}):
            pts = sorted((r["tokens"], r["ms"], r["peak_mib"]) for r in rs if r["impl"] == impl)
            style = dict(marker="o", color=colors[impl], label=impl,
                         linestyle="-" if len({p[0] for p in pts}) == len(pts) else "none")
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            mem = [(p[0], p[2]) for p in pts if p[2]]
            if mem:
                axes[1][j].plot(*zip(*mem), **style)
        for i, ylabel in enumerate(("median ms (fwd+bwd)", "peak MiB beyond inputs")):
            axes[i][j].set_xscale("log")
            axes[i][j].set_yscale("log")
            for axis in (axes[i][j].xaxis, axes[i][j].yaxis):  # decades only: no overlaps
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axes[i][j].set_xlabel("tokens")
            axes[i][j].set_ylabel(ylabel)
            if axes[i][j].get_legend_handles_labels()[0]:
                axes[i][j].legend(fontsize=7)
        axes[0][j].set_title(op)
    fig.suptitle(dev_name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_results(rows, args, argv, dev_name, dtype, rates, ours_backend, load_at_start):
    """JSON, markdown and plot of the rows so far (after every job: a run that dies, killed
    for memory say, keeps what it measured)."""
    meta = dict(device=dev_name, date=dt.date.today().isoformat(), torch=torch.__version__,
                dqo_kernels=dqo_kernels.__version__, python=platform.python_version(),
                dtype=str(dtype), ours_dqo_loss_backend=ours_backend, rates=rates,
                threads=torch.get_num_threads(), loadavg_at_start=load_at_start,
                command="python benchmarks/run.py " + " ".join(argv or sys.argv[1:]),
                # these change CPU timings a lot (THP: page faults of fresh large buffers)
                env={k: os.environ.get(k) for k in (
                    "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                    "DQO_KERNELS_POOL", "DQO_KERNELS_HUGEPAGES")})
    if installed("triton"):
        import triton
        meta["triton"] = triton.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("cuda" if "cpu" not in dev_name.lower() else "cpu") + f"-{meta['date']}" + (
        "-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    render(meta, rows, args.out / stem)


def render(meta, rows, stem: Path) -> None:
    """The markdown tables and the plot of a results JSON (``--render`` redoes them)."""
    rates, load = meta["rates"], meta.get("loadavg_at_start")  # older files lack some keys
    lines = [f"# dqo-kernels benchmarks on {meta['device']}", "",
             f"`{meta['command'].strip()}`, {meta['date']}, torch {meta['torch']}"
             + (f", triton {meta['triton']}" if "triton" in meta else "")
             + f", {meta['dtype']}; copy {rates['bandwidth_GBps']:.1f} GB/s, matmul "
             f"{rates['matmul_TFLOPs']:.3f} TFLOP/s (measured)"
             + (f"; {meta['threads']} threads" if "threads" in meta else "")
             + (f", load average {load[0]:.2f} at start" if load else ""), "",
             "Against the strongest peer of each op (the fastest one that ran; > 1: ours is "
             "faster; memory: peak beyond the inputs):", "",
             "| op | shape | ours ms | strongest peer | its ms | peer / ours | ours MiB "
             "| its MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    mib = lambda r: "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"  # noqa: E731
    for key, (ours, peer) in strongest_peers(rows).items():
        op, shape = key
        lines.append(f"| {op} | {list(shape)} | {ours['ms']:.3f} | {peer['impl']} | "
                     f"{peer['ms']:.3f} | {peer['ms'] / ours['ms']:.2f}x | {mib(ours)} | "
                     f"{mib(peer)} |")
    lines += ["", "Every implementation (``eager`` for dqo_loss is the Python loop over T, the "
              "shape of verl's GAE, not a strong peer):", "",
              "| op | shape | impl | median ms | peak MiB | time / ours | floor ms | floor % |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | failed: {r['failed']} "
                         f"| | | {r['floor_ms']:.3f} | |")
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {mib(r)} | "
                     f"{r['time_vs_ours']:.2f}x | {r['floor_ms']:.3f} | "
                     f"{100 * r['floor_frac']:.1f}% |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"), meta["device"])
    print(f"wrote {stem}.json, .md and .png")
