"""Speed and memory of the dqo_kernels ops against what users would otherwise run.

    python benchmarks/run.py              # every op and shape for this device
    python benchmarks/run.py --quick      # a few small shapes
    python benchmarks/run.py --ops dqo_loss,linear_logprobs --memory

Each op is timed forward + backward, median of repeated runs, for every implementation that
can run here, all in one process:

Ours is the Triton kernels on CUDA and the native kernels (``csrc/``) on CPU.

- ``dqo_loss``: ours vs ``torchrl`` (torchrl's vectorised ``vec_td_lambda_return_estimate``
  for the lambda-returns, then the IS-weighted losses in eager torch: the strongest thing a
  user would otherwise write) vs ``eager`` (the PyTorch reference: a Python loop over T with
  autograd, the shape of verl's ``compute_gae_advantage_return``) vs ``compile``
  (torch.compile of it, GPU, short T only).
- ``token_logprobs``: ours vs TRL's ``selective_log_softmax`` vs eager
  ``log_softmax(logits).gather`` vs its torch.compile, and flash-attn's Triton cross-entropy /
  Liger-Kernel's cross-entropy where installed (GPU).
- ``linear_logprobs``: ours vs Cut Cross-Entropy (``impl="torch_compile"`` on CPU, its Triton
  kernel on GPU) vs eager (``h @ W.T`` then log_softmax) vs its torch.compile, and
  Liger-Kernel's fused linear cross-entropy (GPU).

The peers are optional installs (``pip install torchrl tensordict trl cut-cross-entropy``, or
``--no-deps`` into a directory on ``PYTHONPATH``); one that is missing or fails is a row with
its error. The headline of each op is its strongest peer: the fastest one that ran.
- ``loss_head``: hidden states -> log-probs -> DQO loss -> backward, ours vs eager.

Peak memory: on CUDA the allocator's peak beyond the inputs; on CPU, with ``--memory``, the
peak RSS of a subprocess running one forward+backward minus that of one that only builds the
inputs. The roofline floor of each op is its unavoidable bytes over the measured copy
bandwidth, or its matmul flops over the measured matmul rate, whichever is larger; ``floor %``
is floor / our time. Results: ``benchmarks/results/<device>-<date>.{json,md,png}``. Absolute
times are only meaningful with the device name; on CPU compare ratios within one run.
Triton-interpreter timings are refused (TRITON_INTERPRET=1). A peer that fails (out of
memory, say) is a row of the table with its error. The same steps as a pytest-benchmark suite:
``python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-only``.

Code: ``harness.py`` (timing, memory probes, floors), ``peers.py``, ``cases/`` (one module per
op: inputs, implementations, shapes), ``report.py`` (JSON, tables, plot); this file is the CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/run.py: refusing to time the Triton interpreter (TRITON_INTERPRET=1)")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dqo_kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness and the cases
import harness  # noqa: E402
from cases import OPS, build, floor_bytes_flops, needed_bytes, plan, tokens  # noqa: E402
from harness import (  # noqa: E402
    available_bytes,
    cpu_peak_mib,
    cuda_peak_mib,
    measure_rates,
    probe_peak_mib,
    release_memory,
    roofline_ms,
    set_min_time,
    time_ms,
)
from report import render, write_results  # noqa: E402

import dqo_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def probe(spec: str) -> None:
    """Subprocess entry of harness.cpu_peak_mib: print this process's peak RSS in MiB."""
    op, impl, shape = json.loads(spec)
    # the baseline of an implementation is itself, built but not run: its inputs, its
    # imports (torchrl's alone are ~200 MiB) and its set-up are not the op's memory
    step = build(op, impl.split(":")[-1], shape, torch.device("cpu"), torch.float32)
    print(probe_peak_mib(None if impl.startswith("built-only:") else step))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--memory", action="store_true", help="CPU: measure peak RSS (slow)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--min-time", type=float, default=harness.MIN_TIME_S,
                   help="CPU: seconds to time each implementation for, at least")
    p.add_argument("--models", default="", help="only the vocabulary ops of these models "
                   "(comma-separated names of the plan: small, qwen2.5-0.5b, ...)")
    p.add_argument("--tag", default="", help="appended to the results' file names")
    p.add_argument("--render", type=Path, help="redo the markdown and plot of a results JSON")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return probe(args.probe)
    set_min_time(args.min_time)
    if args.render:
        res = json.loads(args.render.read_text())
        return render(res["meta"], res["rows"], args.render.with_suffix(""))

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # timings on a busy machine say nothing: on record
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (30 if gpu else 5)
    dev_name = torch.cuda.get_device_name() if gpu else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    rates = measure_rates(device)
    print(f"{dev_name}: copy {rates['bandwidth_GBps']:.1f} GB/s, {rates['matmul_dtype']} "
          f"matmul {rates['matmul_TFLOPs']:.3f} TFLOP/s", flush=True)
    ours_backend = dqo_kernels.resolve_backend(None, device)
    rows = []
    models = set(filter(None, args.models.split(",")))
    for job in plan(device, args.quick, args.ops.split(",")):
        if models and "model" in job and job["model"] not in models:
            continue
        op, shape = job["op"], job["shape"]
        elem = torch.tensor([], dtype=dtype).element_size()
        floor = roofline_ms(rates, *floor_bytes_flops(op, shape, elem))
        res, failed = {}, {}
        for impl in job["impls"]:
            need, have = needed_bytes(op, impl, shape, elem), available_bytes(device)
            if have is not None and need > 0.9 * have:  # the OOM killer takes the whole run
                failed[impl] = (f"skipped: needs ~{need / 2**30:.0f} GiB, "
                                f"{have / 2**30:.0f} GiB available")
                print(f"  {op} {shape} {impl}: {failed[impl]}", flush=True)
                continue
            try:
                fn = build(op, impl, shape, device, dtype)
                ms = time_ms(fn, device, reps if impl == "ours" else max(3, reps // 3))
                mem = cuda_peak_mib(fn) if gpu else None
                fn = None
                release_memory(device)  # the next implementation, or the probes, need it
                if not gpu and args.memory:
                    mem = cpu_peak_mib(op, impl, shape)
            except Exception as e:  # an OOM or a peer's failure is a result, not a crash
                first = (str(e).strip().splitlines() or [""])[0][:160]
                failed[impl] = f"{type(e).__name__}: {first}"
                print(f"  {op} {shape} {impl}: failed ({failed[impl]})", flush=True)
                continue
            finally:
                fn = None
                release_memory(device)
            res[impl] = (ms, mem)
        if "ours" not in res:
            continue
        n_tokens = tokens(op, shape)
        for impl, (ms, mem) in res.items():
            rows.append(dict(op=op, shape=shape, model=job.get("model"), tokens=n_tokens, impl=impl,
                             ms=ms, peak_mib=mem, time_vs_ours=ms / res["ours"][0],
                             floor_ms=floor, floor_frac=floor / ms))
        for impl, why in failed.items():
            rows.append(dict(op=op, shape=shape, model=job.get("model"), tokens=n_tokens, impl=impl,
                             ms=None, peak_mib=None, time_vs_ours=None, floor_ms=floor,
                             floor_frac=None, failed=why))
        print(f"{op:16s} {str(shape):24s} " + "  ".join(
            f"{i}={ms:9.3f}ms" + (f"/{m:.0f}MiB" if m is not None else "")
            for i, (ms, m) in res.items()) + f"  floor={floor:.3f}ms", flush=True)
        write_results(rows, args, argv, dev_name, dtype, rates, ours_backend, load_at_start)


if __name__ == "__main__":
    main()
