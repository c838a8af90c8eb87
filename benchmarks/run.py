"""Speed and memory of the fused DQO loss against what users would otherwise run.

    python benchmarks/run.py            # all shapes for this device
    python benchmarks/run.py --quick    # a few small shapes (a minute on 2 CPU cores)

Forward + backward of the loss on [B, T] inputs, median of repeated runs, for each backend that
can run here:

- ``ours``: the auto backend (the native C++ kernel on CPU, Triton on CUDA),
- ``eager``: the PyTorch reference, a Python loop over T with autograd: the shape of the
  lambda-return loops in verl's ``compute_gae_advantage_return`` and most trainers,
- ``compile``: ``torch.compile`` of that reference (GPU only, short T: it unrolls the loop).

Results go to ``benchmarks/results/<device>-<date>.json`` and ``.md``. On CPU only ratios
measured in the same run are meaningful; absolute times are reported for GPUs with their name.
Triton-interpreter timings are never reported: ``TRITON_INTERPRET=1`` is refused.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/run.py: refusing to time the Triton interpreter (TRITON_INTERPRET=1)")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqo_kernels  # noqa: E402
from dqo_kernels import fused_dqo_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    prompt = torch.randint(0, T // 4 + 1, (B,), generator=g)
    length = torch.randint(T // 4, T - T // 4 + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    logp = -torch.rand(B, T, generator=g) * 3
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    values = 0.5 * torch.randn(B, T, generator=g)
    rewards = torch.zeros(B, T)
    last = (prompt + length - 1).clamp_min(0)
    rewards[torch.arange(B), last] = (torch.rand(B, generator=g) < 0.5).float()
    rewards = rewards * mask
    out = dict(logp=logp, ref_logp=ref, values=values, rewards=rewards, mask=mask)
    return {k: v.to(device) for k, v in out.items()}


def step_fn(inputs, backend, compiled=False):
    logp = inputs["logp"].clone().requires_grad_(True)
    values = inputs["values"].clone().requires_grad_(True)

    def step():
        logp.grad = values.grad = None
        out = fused_dqo_loss(logp, inputs["ref_logp"], values, inputs["rewards"],
                             inputs["mask"], lam=0.95, backend=backend)
        out.loss.backward()

    if compiled:
        return torch.compile(step)
    return step


def time_it(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        shapes = [(8, 512), (16, 2048), (32, 2048), (8, 8192), (2, 32768)]
        if args.quick:
            shapes = shapes[:2]
        reps = args.reps or 50
        dev_name = torch.cuda.get_device_name()
    else:
        shapes = [(8, 256), (16, 1024), (64, 1024), (16, 4096)]
        if args.quick:
            shapes = shapes[:2]
        reps = args.reps or 5
        dev_name = f"cpu ({platform.processor() or platform.machine()}, " \
                   f"{torch.get_num_threads()} threads)"
    ours = dqo_kernels.resolve_backend(None, device)

    rows = []
    for B, T in shapes:
        inputs = make_inputs(B, T, device)
        cands = [("ours", ours, False), ("eager", "torch", False)]
        if device.type == "cuda" and T <= 512:
            cands.append(("compile", "torch", True))
        res = {}
        for name, backend, compiled in cands:
            fn = step_fn(inputs, backend, compiled)
            ms = time_it(fn, device, reps if name == "ours" else max(3, reps // 5))
            res[name] = dict(backend=backend, ms=ms, peak_mib=peak_mem(fn, device))
        for name, r in res.items():
            rows.append(dict(op="dqo_loss fwd+bwd", B=B, T=T, impl=name, backend=r["backend"],
                             ms=r["ms"], peak_mib=r["peak_mib"],
                             speedup_of_ours=r["ms"] / res["ours"]["ms"]))
        print(f"B={B:4d} T={T:6d}  " + "  ".join(
            f"{n}={r['ms']:9.3f} ms" for n, r in res.items())
            + f"  eager/ours={res['eager']['ms'] / res['ours']['ms']:.1f}x", flush=True)

    meta = dict(device=dev_name, date=dt.date.today().isoformat(), torch=torch.__version__,
                dqo_kernels=dqo_kernels.__version__, python=platform.python_version(),
                command="python benchmarks/run.py" + (" --quick" if args.quick else ""))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.type}-{meta['date']}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# dqo_loss forward+backward on {dev_name}", "",
             ", ".join(f"{k} {v}" for k, v in meta.items() if k != "device"), "",
             "| B | T | impl | backend | median ms | peak MiB | time / ours |",
             "|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"| {r['B']} | {r['T']} | {r['impl']} | {r['backend']} | {r['ms']:.3f} "
                     f"| {mem} | {r['speedup_of_ours']:.1f}x |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
