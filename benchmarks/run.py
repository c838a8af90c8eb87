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
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks/run.py: refusing to time the Triton interpreter (TRITON_INTERPRET=1)")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqo_kernels  # noqa: E402
from dqo_kernels import fused_dqo_loss, linear_logprobs, token_logprobs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("dqo_loss", "token_logprobs", "linear_logprobs", "loss_head")


# ---------------------------------------------------------------------------------------------
# inputs


def dqo_inputs(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, T // 4 + 1, (B,), generator=g)
    length = torch.randint(max(1, T // 4), T - T // 4 + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    logp = -torch.rand(B, T, generator=g) * 3
    # log-probs are <= 0 (the loss's data checks refuse positive ones)
    out = dict(logp=logp, ref_logp=(logp + 0.1 * torch.randn(B, T, generator=g)).clamp(max=0),
               values=0.5 * torch.randn(B, T, generator=g), mask=mask)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (prompt + length - 1).clamp(0, T - 1)] = 1.0
    out["rewards"] = rewards * mask
    return {k: v.to(device) for k, v in out.items()}


def logit_inputs(N, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=(2 * torch.randn(N, V, generator=g)).to(device, dtype),
                targets=torch.randint(0, V, (N,), generator=g).to(device))


def linear_inputs(N, D, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(N, D, generator=g).to(device, dtype),
                weight=(torch.randn(V, D, generator=g) / D ** 0.5).to(device, dtype),
                targets=torch.randint(0, V, (N,), generator=g).to(device))


# ---------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument step (forward + backward)


def dqo_step(x, backend):
    logp = x["logp"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)

    def step():
        logp.grad = values.grad = None
        out = fused_dqo_loss(logp, x["ref_logp"], values, x["rewards"], x["mask"], lam=0.95,
                             backend=backend)
        out.loss.backward()
    return step


def torchrl_dqo_step(x, beta=0.1, lam=0.95, gamma=1.0, is_clip=1.0):
    """The DQO loss as a user would write it with torchrl: its vectorised TD(lambda) for the
    returns of the soft rewards, then the truncated-IS-weighted losses in eager torch
    (token-mean). Exact for rows whose actions are contiguous, as the benchmark's are."""
    from torchrl.objectives.value.functional import vec_td_lambda_return_estimate

    logp = x["logp"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)
    ref, rewards, mask = x["ref_logp"], x["rewards"], x["mask"]
    m = mask.float()
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).float().argmax(-1)
    done = torch.zeros_like(mask)
    done[torch.arange(mask.shape[0]), last] = True
    log_c = math.log(is_clip)

    def step():
        logp.grad = values.grad = None
        l_t = logp - ref
        soft = (rewards - beta * l_t.detach()) * m
        next_v = torch.cat([values.detach()[:, 1:], torch.zeros_like(values[:, :1])], 1)
        g = vec_td_lambda_return_estimate(gamma, lam, next_v[..., None], soft[..., None],
                                          done[..., None], done[..., None])[..., 0]
        c = torch.cumsum((logp.detach() - ref) * m, -1)
        w = torch.exp(torch.clamp(c, max=log_c)) * m
        n = m.sum()
        delta = beta * l_t + values.detach() - (g + beta * l_t.detach())
        loss = (0.5 * w * delta ** 2).sum() / n + (0.5 * w * (values - g) ** 2).sum() / n
        loss.backward()
    return step


def eager_token_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


def eager_linear_logprobs(hidden, weight, targets):
    return eager_token_logprobs(hidden @ weight.T, targets)


def token_step(x, impl):
    logits = x["logits"].clone().requires_grad_(True)
    up = torch.randn(logits.shape[0], device=logits.device)
    if impl == "ours":
        fn = lambda: token_logprobs(logits, x["targets"])  # noqa: E731
    elif impl in ("eager", "compile"):
        f = torch.compile(eager_token_logprobs) if impl == "compile" else eager_token_logprobs
        fn = lambda: f(logits, x["targets"])  # noqa: E731
    elif impl == "trl":
        from trl.trainer.utils import selective_log_softmax
        fn = lambda: selective_log_softmax(logits, x["targets"])  # noqa: E731
    elif impl == "flash_attn_ce":
        from flash_attn.losses.cross_entropy import CrossEntropyLoss
        ce = CrossEntropyLoss(reduction="none")
        fn = lambda: -ce(logits, x["targets"])  # noqa: E731
    elif impl == "liger_ce":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss(reduction="none")
        fn = lambda: -ce(logits, x["targets"])  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        logits.grad = None
        fn().backward(up)
    return step


def linear_step(x, impl):
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    up = torch.randn(h.shape[0], device=h.device)
    t = x["targets"]
    if impl == "ours":
        fn = lambda: linear_logprobs(h, w, t)  # noqa: E731
    elif impl in ("eager", "compile"):
        f = torch.compile(eager_linear_logprobs) if impl == "compile" else eager_linear_logprobs
        fn = lambda: f(h, w, t)  # noqa: E731
    elif impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        fn = lambda: -ce(w, h, t)  # noqa: E731
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy
        kw = {} if h.is_cuda else {"impl": "torch_compile"}  # its kernel is Triton-on-GPU
        fn = lambda: -linear_cross_entropy(h, w, t, reduction="none", **kw)  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        h.grad = w.grad = None
        fn().backward(up)
    return step


def head_step(x, impl, B, T):
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    d = dqo_inputs(B, T, h.device)
    values = d["values"].clone().requires_grad_(True)
    targets = x["targets"].view(B, T).masked_fill(~d["mask"], -100)

    def step():
        h.grad = w.grad = values.grad = None
        if impl == "ours":
            logp = linear_logprobs(h.view(B, T, -1), w, targets)
            backend = None
        else:
            logp = eager_linear_logprobs(h, w, targets.clamp_min(0).view(-1)).view(B, T)
            backend = "torch"
        out = fused_dqo_loss(logp, d["ref_logp"], values, d["rewards"], d["mask"], lam=0.95,
                             backend=backend)
        out.loss.backward()
    return step


PEER_MODULES = {"torchrl": "torchrl", "trl": "trl", "cce": "cut_cross_entropy",
                "liger_ce": "liger_kernel", "liger_flce": "liger_kernel",
                "flash_attn_ce": "flash_attn"}


def peer_installed(impl: str) -> bool:
    """True for ours and torch's own implementations, else if the peer's package imports."""
    return impl not in PEER_MODULES or installed(PEER_MODULES[impl])


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# CPU: an implementation is timed for at least this long (more repetitions of fast steps: the
# median of 5 steps of 0.5 ms moved by 1.7x between two runs here)
MIN_TIME_S = 1.0


def set_min_time(seconds: float) -> None:
    global MIN_TIME_S
    MIN_TIME_S = seconds


def time_ms(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=max(100, reps * 10), return_mode="median"))
        except ImportError:
            pass
    times = []
    while len(times) < reps or sum(times) < 1e3 * MIN_TIME_S:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def release_memory(device) -> None:
    """What the last implementation left behind: its inputs and its cached buffers (ours on
    CPU keep the gradient buffer for the next step; a 5 GB one beside a probe's 15 GB ran
    this 24 GiB machine out of memory)."""
    gc.collect()
    dqo_kernels.empty_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_peak_mib(op: str, impl: str, shape: List[int]) -> Optional[float]:
    """Peak RSS of the second forward+backward in a fresh process (the first one warms up,
    and compiles for torch.compile), minus that of a process that builds the same
    implementation (inputs, imports, set-up) but does not run it."""
    def run(what):
        cmd = [sys.executable, __file__, "--probe", json.dumps([op, what, shape])]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    peak, base = run(impl), run(f"built-only:{impl}")
    return None if peak is None or base is None else max(0.0, peak - base)


def measure_rates(device) -> Dict[str, float]:
    """Copy bandwidth (GB/s) and fp32 (CPU) / bf16 (GPU) matmul rate (TFLOP/s), measured."""
    n = 2**30  # well past any last-level cache
    a = torch.rand(n // 4, dtype=torch.float32, device=device)  # touched: no shared zero page
    b = torch.zeros_like(a)
    ms = time_ms(lambda: b.copy_(a), device, reps=10)
    bw = 2 * n / (ms / 1e3) / 1e9
    k = 2048 if device.type == "cpu" else 8192
    dt_ = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = torch.randn(k, k, device=device, dtype=dt_)
    ms = time_ms(lambda: x @ x, device, reps=5)
    return {"bandwidth_GBps": bw, "matmul_TFLOPs": 2 * k ** 3 / (ms / 1e3) / 1e12,
            "matmul_dtype": str(dt_)}


def floor_ms(op: str, shape, elem: int, rates) -> float:
    bw, mm = rates["bandwidth_GBps"] * 1e9, rates["matmul_TFLOPs"] * 1e12
    if op == "dqo_loss":
        B, T = shape
        # read logp, ref, values, rewards, mask; write returns, weights, td, 2 grads
        return B * T * (4 * 4 + 1 + 5 * 4) / bw * 1e3
    if op == "token_logprobs":
        N, V = shape
        return 3 * N * V * elem / bw * 1e3  # read logits twice (fwd, bwd), write the grad
    N, D, V = shape[-3:] if op == "linear_logprobs" else (shape[0] * shape[1], *shape[2:])
    flops = 6 * N * D * V  # forward logits, grad of hidden, grad of weight
    return max(flops / mm, (2 * V * D + 2 * N * D) * elem / bw) * 1e3


# ---------------------------------------------------------------------------------------------


def plan(device, quick: bool, ops) -> List[Dict]:
    gpu = device.type == "cuda"
    jobs = []
    if "dqo_loss" in ops:
        shapes = ([(2, 512), (8, 512), (16, 2048), (32, 2048), (8, 8192), (2, 32768)] if gpu
                  else [(8, 256), (16, 1024), (64, 1024), (16, 4096), (2, 32768)])
        for s in shapes[:2] if quick else shapes:
            impls = ["ours", "torchrl", "eager"] + (["compile"] if gpu and s[1] <= 512 else [])
            jobs.append(dict(op="dqo_loss", shape=list(s), impls=impls))
    # name, hidden size, vocabulary, token counts of each op. On CPU, a 32k vocabulary at
    # several sizes and Qwen2.5-0.5B's head (896 x 151936) at the sizes of issue 14's goals.
    # 64k tokens on GPU: eager's [N, V] logits and their fp32 softmax no longer fit (a row of
    # its failure).
    gpu_tokens = [1024, 4096, 16384, 65536]
    vocab = [("qwen2-7b", 3584, 152064, dict.fromkeys(OPS, gpu_tokens)),
             ("llama3-8b", 4096, 128256, dict.fromkeys(OPS, gpu_tokens))] if gpu else [
        ("small", 512, 32000, dict(token_logprobs=[256, 1024, 4096, 8192],
                                   linear_logprobs=[256, 1024, 4096], loss_head=[256, 4096])),
        ("qwen2.5-0.5b", 896, 151936, dict(token_logprobs=[8192], linear_logprobs=[4096],
                                           loss_head=[4096]))]
    for name, D, V, tokens in vocab[:1] if quick else vocab:
        sizes = {op: ns[:1] if quick else ns for op, ns in tokens.items()}
        if "token_logprobs" in ops:
            for N in sizes["token_logprobs"]:
                impls = ["ours", "trl", "eager"] + (["compile"] if not quick else [])
                impls += [i for i, m in (("flash_attn_ce", "flash_attn"), ("liger_ce",
                          "liger_kernel")) if gpu and installed(m)]
                jobs.append(dict(op="token_logprobs", shape=[N, V], impls=impls, model=name))
        if "linear_logprobs" in ops:
            for N in sizes["linear_logprobs"]:
                impls = ["ours", "cce", "eager"] + (["compile"] if not quick else [])
                impls += [i for i, m in (("liger_flce", "liger_kernel"),) if gpu and installed(m)]
                jobs.append(dict(op="linear_logprobs", shape=[N, D, V], impls=impls, model=name))
        if "loss_head" in ops:
            for N in sizes["loss_head"]:
                B = max(1, N // 1024) if gpu else max(1, N // 256)
                jobs.append(dict(op="loss_head", shape=[B, N // B, D, V], impls=["ours", "eager"],
                                 model=name))
    return jobs


def build(op, impl, shape, device, dtype):
    if op == "dqo_loss":
        x = dqo_inputs(*shape, device)
        if impl == "torchrl":
            return torchrl_dqo_step(x)
        backend = {"ours": None, "eager": "torch"}.get(impl, "torch")
        step = dqo_step(x, backend)
        return torch.compile(step) if impl == "compile" else step
    if op == "token_logprobs":
        return token_step(logit_inputs(*shape, device, dtype), impl)
    if op == "linear_logprobs":
        return linear_step(linear_inputs(*shape, device, dtype), impl)
    B, T, D, V = shape
    return head_step(linear_inputs(B * T, D, V, device, dtype), impl, B, T)


def probe(spec: str) -> None:
    """Subprocess entry of cpu_peak_mib: print this process's peak RSS in MiB."""
    import resource
    op, impl, shape = json.loads(spec)
    # the baseline of an implementation is itself, built but not run: its inputs, its
    # imports (torchrl's alone are ~200 MiB) and its set-up are not the op's memory
    step = build(op, impl.split(":")[-1], shape, torch.device("cpu"), torch.float32)
    if not impl.startswith("built-only:"):
        step()  # torch.compile compiles here: its compiler's memory is not the op's
        try:  # restart the peak from the current RSS (what a step keeps stays counted)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        step()
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak across
    # fork + exec and make every probe look alike.
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(hwm / 1024)


def needed_bytes(op: str, impl: str, shape, elem: int) -> float:
    """A rough peak of one forward + backward: the [N, V] tensors each implementation holds
    at once (inputs included)."""
    if op == "token_logprobs":  # measured at N=8192, V=151936: eager and TRL ~5 copies
        N, V = shape           # (TRL's OOM-killed a 24 GiB run), torch.compile ~4
        return {"ours": 2, "compile": 4}.get(impl, 5) * N * V * max(elem, 4)
    if op in ("linear_logprobs", "loss_head"):
        N, D, V = (shape if op == "linear_logprobs" else (shape[0] * shape[1], *shape[2:]))
        logits = 0 if impl in ("ours", "cce") else 3 * N * V * 4
        return logits + 3 * V * D * elem
    return 0.0


def available_bytes(device) -> Optional[float]:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024.0 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--memory", action="store_true", help="CPU: measure peak RSS (slow)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--min-time", type=float, default=MIN_TIME_S,
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
        floor = floor_ms(op, shape, elem, rates)
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
        tokens = shape[0] * shape[1] if op in ("dqo_loss", "loss_head") else shape[0]
        for impl, (ms, mem) in res.items():
            rows.append(dict(op=op, shape=shape, model=job.get("model"), tokens=tokens, impl=impl,
                             ms=ms, peak_mib=mem, time_vs_ours=ms / res["ours"][0],
                             floor_ms=floor, floor_frac=floor / ms))
        for impl, why in failed.items():
            rows.append(dict(op=op, shape=shape, model=job.get("model"), tokens=tokens, impl=impl,
                             ms=None, peak_mib=None, time_vs_ours=None, floor_ms=floor,
                             floor_frac=None, failed=why))
        print(f"{op:16s} {str(shape):24s} " + "  ".join(
            f"{i}={ms:9.3f}ms" + (f"/{m:.0f}MiB" if m is not None else "")
            for i, (ms, m) in res.items()) + f"  floor={floor:.3f}ms", flush=True)
        write_results(rows, args, argv, dev_name, dtype, rates, ours_backend, load_at_start)



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


if __name__ == "__main__":
    main()
