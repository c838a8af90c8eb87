"""The GPU checklist in one process: correctness of the Triton kernels on a real GPU, then the
headline timings, inside a time budget that fits one 10-minute device call.

    python benchmarks/gpu_check.py --out DIR                  # both halves, ~7 minutes on an H200
    python benchmarks/gpu_check.py --sections check --out DIR  # one half
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --tiny --sections check,bench --out DIR
        # on CPU in the Triton interpreter at toy sizes, in seconds (CI runs this): the checks
        # must pass; the bench code runs once per row, its timings mean nothing

On a lent device (wheels from ``benchmarks/gpu_wheels.sh``, carried in ``.whl/``)::

    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site
                 .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3
                 benchmarks/gpu_check.py --out $OUT", carry=[".whl"], timeout_s=540)
    give_back()

It writes at most four files into ``--out``: ``check.json``, ``bench.json``, ``summary.md`` and
``log.txt`` (the summary is also printed last). Exit status 1 if a check failed.

**check** (fresh random inputs, fp32/bf16):

- ``fused_dqo_loss(..., backend="triton")`` against the float64 CPU kernel (``backend="cpp"``;
  ``"torch"`` where the native kernel cannot be built, short rows only) at shapes from (1, 1) to
  (2, 32768) and (64, 8192), every layout (full, ragged right padding, left padding, all-padding
  rows, interleaved environment tokens, strided views of every input with NaN off the mask),
  five option sets (clip / no clip, the IS switches, ``target_grad``, bootstrap, the three
  aggregations); forward (losses, returns, weights, td_error) and backward (``logp``, ``values``),
  every run twice and compared bit for bit, the allocator's free blocks poisoned with NaN before
  each run and every output required finite;
- ``token_logprobs`` at V = 152064 in fp32 and bf16 with temperature, ignored rows and entropy
  (forward and backward against float64), and N = 16384 bf16 rows whose element offsets pass
  2^31 (the rows past the offset checked);
- ``linear_logprobs`` at N = 4096, D = 3584, V = 152064 bf16 on LM-like logits: its error
  against an fp32 reference, for ``logp``, ``d_hidden`` and ``d_weight``, at most 1.5x that of
  eager torch in bf16.

**bench** (inputs made on the GPU once per shape; CUDA events, median; L2 flushed between
repetitions; peak memory from ``max_memory_allocated`` after ``reset_peak_memory_stats``):

- the scan alone (the Triton launcher) and ``fused_dqo_loss`` forward + backward with the data
  checks on and off at [16, 2048], [64, 8192], [2, 32768], against the HBM floor (the bytes
  that must move over the copy bandwidth measured in this run);
- ``token_logprobs`` against eager and Liger's cross-entropy; ``linear_logprobs`` against eager,
  Cut Cross-Entropy and Liger's fused linear cross-entropy at N = 16384, D = 3584, V = 152064
  bf16 with per-token upstream gradients, targets sampled from the softmax; every peer's output
  is compared with ours (its row records the error); a missing or failing peer is a row with its
  error.

Every part looks at the clock first: what would overrun the budget (``--budget``, 420 s) is a
row marked ``skipped: budget``. Nothing here needs more than torch 2.11 and Triton 3.6.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("check", "bench")
# Where the check half stops when both halves run, as a fraction of the budget.
CHECK_SHARE = 0.55


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=None,
                   help="check, bench or check,bench (default: both; --tiny: check)")
    p.add_argument("--out", type=Path, default=Path("gpu-out"), help="output directory")
    p.add_argument("--tiny", action="store_true",
                   help="on CPU in the Triton interpreter at toy sizes (default: the check "
                        "half; the bench half runs its code once, timings meaningless)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sections = args.sections or ("check" if args.tiny else "check,bench")
    args.sections = [s.strip() for s in sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        p.error(f"--sections: expected a comma-separated subset of {SECTIONS}, got {sections!r}")
    return args


class Run:
    """The run's clock, log and device."""

    def __init__(self, args, torch):
        self.args, self.torch = args, torch
        self.t0 = time.monotonic()
        args.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(args.out / "log.txt", "w")
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny
                                   else "cpu")
        self.deadline = args.budget

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over(self, estimate: float = 0.0) -> bool:
        """True if something that takes ``estimate`` seconds would overrun the deadline."""
        return self.elapsed() + estimate > self.deadline

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def environment(args, torch) -> dict:
    import triton
    env = dict(command=" ".join(["python", "benchmarks/gpu_check.py"]
                                + [shlex.quote(a) for a in sys.argv[1:]]),
               started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(),
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
               host=platform.node(), budget_s=args.budget, seed=args.seed)
    if torch.cuda.is_available() and not args.tiny:
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0),
                   multiprocessors=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({type(e).__name__})"
    else:
        env["device"] = "cpu (Triton interpreter)" if env["interpreter"] else "cpu"
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version
            env[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            env[mod] = "not installed"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["commit"] = None
    return env


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


# --------------------------------------------------------------------------------------------
# Comparisons


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (inf where x is not finite)."""
    torch = sys.modules["torch"]
    x = x.detach().to(ref.device, torch.float64)
    ref = ref.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return math.inf
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(x - ref))
    return num / den if den > 0 else num


def max_abs(x, ref) -> float:
    torch = sys.modules["torch"]
    d = (x.detach().to(ref.device, torch.float64) - ref.detach().to(torch.float64)).abs()
    return float(d.max()) if d.numel() else 0.0


def same_bits(a, b) -> bool:
    """Bit-for-bit equal (NaN included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool((a.detach().contiguous().view(-1).view(
        __import__("torch").uint8) == b.detach().contiguous().view(-1).view(
        __import__("torch").uint8)).all())


def poison(torch, device, nbytes_list) -> None:
    """Fill the CUDA allocator's next free blocks of these sizes with NaN, so that an output the
    kernel does not write reads back as NaN (best effort: the allocator reuses freed blocks)."""
    if device.type != "cuda":
        return
    bufs = [torch.full((max(1, n // 4),), float("nan"), device=device) for n in nbytes_list]
    del bufs


# --------------------------------------------------------------------------------------------
# check: the fused DQO loss

LAYOUTS = ("full", "ragged", "left", "pad_rows", "interleaved", "strided")
OPTION_SETS = {
    "default": dict(),
    "noclip_gae": dict(is_clip=math.inf, lam=0.95, gamma=0.99, behavior=True,
                       loss_agg="seq-mean-token-mean"),
    "no_is": dict(is_policy=False, is_value=False, is_clip=2.0, lam=0.0,
                  loss_agg="seq-mean-token-sum"),
    "target_grad": dict(target_grad=True, lam=0.9, gamma=0.97, is_clip=1.5, behavior=True,
                        num_tokens=True),
    "bootstrap": dict(bootstrap=True, lam=0.8, gamma=0.99, is_policy=False, beta=0.05),
}
SCAN_SHAPES = [(1, 1), (1, 2), (2, 17), (3, 1000), (4, 1024), (4, 1025), (8, 2048), (3, 5000),
               (64, 8192), (2, 32768)]
TINY_SCAN_SHAPES = [(1, 1), (2, 17), (3, 40)]
# ||ours - float64|| / ||float64||: the scan computes in fp32 from the inputs as given; the
# gradients come back in the inputs' dtype (bf16 rounding: ~2e-3)
SCAN_TOL = 1e-4
SCAN_GRAD_TOL = {"float32": 1e-4, "bfloat16": 8e-3}


def scan_mask(torch, B, T, layout, g):
    m = torch.zeros(B, T, dtype=torch.bool)
    if layout == "full":
        return m | True
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for b in range(B):
        L = int(lengths[b])
        if layout in ("ragged", "pad_rows"):
            m[b, :L] = True
        elif layout == "left":
            m[b, T - L:] = True
        else:  # interleaved / strided: a prompt, then actions with environment tokens inside
            start = int(torch.randint(0, max(1, T - L + 1), (1,), generator=g))
            m[b, start:start + L] = torch.rand(L, generator=g) > 0.3
    if layout == "pad_rows":
        m[::3] = False  # rows 0, 3, ...: all padding (with B = 1, the whole batch)
    return m


def scan_inputs(torch, B, T, layout, opts, dtype, device, g):
    """The inputs of one case, on ``device``: a dict of tensors (views for ``strided``)."""
    mask = scan_mask(torch, B, T, layout, g)
    logp = -3 * torch.rand(B, T, generator=g)
    ref = (logp + 0.05 * torch.randn(B, T, generator=g)).clamp(max=0)
    beh = (logp + 0.02 * torch.randn(B, T, generator=g)).clamp(max=0)
    values = torch.randn(B, T, generator=g)
    rewards = torch.zeros(B, T)
    idx = torch.arange(T).expand(B, T)
    last = torch.where(mask, idx, -1).max(dim=1).values
    for b in range(B):
        if last[b] >= 0:
            rewards[b, last[b]] = float(torch.randn(1, generator=g))
    rewards += torch.where(torch.rand(B, T, generator=g) < 0.01,
                           torch.randn(B, T, generator=g), torch.zeros(()))
    rewards = torch.where(mask, rewards, torch.zeros(()))
    pad = math.nan if layout in ("left", "strided") else 7.0  # off the mask: any value
    for x in (logp, ref, beh, values):
        x.masked_fill_(~mask, pad)
    t = dict(logp=logp, ref_logp=ref, values=values, rewards=rewards, mask=mask)
    if opts.get("behavior"):
        t["behavior_logp"] = beh
    if opts.get("bootstrap"):
        t["bootstrap"] = torch.randn(B, generator=g)
    out = {}
    for k, x in t.items():
        x = x if k == "mask" else x.to(dtype)
        if layout == "strided" and x.dim() == 2:
            # every [B, T] input a view with a column stride of 2 (and the mask transposed)
            big = torch.full((B, 2 * T), 5, dtype=x.dtype)
            big[:, ::2] = x
            x = big.to(device)[:, ::2] if k != "mask" else \
                big.t().contiguous().to(device).t()[:, ::2]
        else:
            x = x.to(device)
        out[k] = x
    return out


def scan_call(torch, fused_dqo_loss, inp, opts, backend, dtype=None):
    """One forward + backward; returns every output (float tensors) by name."""
    kw = {k: v for k, v in opts.items() if k not in ("behavior", "bootstrap", "num_tokens")}
    if opts.get("num_tokens"):
        kw["num_tokens"] = max(1.0, float(inp["mask"].sum()) * 1.5)
    x = {k: (v if dtype is None or k == "mask" else v.to(dtype)) for k, v in inp.items()}
    # logp and values: leaves that may be views (strided): the gradient reaches the base
    base_lp = x["logp"].detach().clone() if x["logp"].is_contiguous() else None
    if base_lp is None:
        big_lp = torch.empty(x["logp"].shape[0], 2 * x["logp"].shape[1], dtype=x["logp"].dtype,
                             device=x["logp"].device)
        big_v = torch.empty_like(big_lp)
        big_lp[:, ::2] = x["logp"]
        big_v[:, ::2] = x["values"]
        big_lp.requires_grad_()
        big_v.requires_grad_()
        lp, v = big_lp[:, ::2], big_v[:, ::2]
        grads = lambda: (big_lp.grad[:, ::2], big_v.grad[:, ::2])  # noqa: E731
    else:
        lp = base_lp.requires_grad_()
        v = x["values"].detach().clone().requires_grad_()
        grads = lambda: (lp.grad, v.grad)  # noqa: E731
    out = fused_dqo_loss(lp, x["ref_logp"], v, x["rewards"], x["mask"],
                         behavior_logp=x.get("behavior_logp"), bootstrap=x.get("bootstrap"),
                         backend=backend, **kw)
    (0.7 * out.policy_loss + 1.3 * out.value_loss).backward()
    g_lp, g_v = grads()
    return dict(loss=out.loss.detach(), policy_loss=out.policy_loss.detach(),
                value_loss=out.value_loss.detach(), returns=out.returns, weights=out.weights,
                td_error=out.td_error, grad_logp=g_lp, grad_values=g_v)


def check_scan(run, results):
    torch = run.torch
    from dqo_kernels import fused_dqo_loss
    from dqo_kernels._native import load as native
    ref_backend = "cpp" if native.is_available() else "torch"
    run.log(f"scan: reference backend={ref_backend} (float64, CPU)")
    shapes = TINY_SCAN_SHAPES if run.args.tiny else SCAN_SHAPES
    dtypes = (torch.float32, torch.bfloat16)
    g = torch.Generator().manual_seed(run.args.seed)
    i = 0
    for B, T in shapes:
        for layout in LAYOUTS:
            for opt_name, opts in OPTION_SETS.items():
                for dtype in dtypes:
                    i += 1
                    if run.args.tiny and i % 3:  # toy run: every third case (both dtypes)
                        continue
                    row = dict(part="scan", shape=[B, T], layout=layout, options=opt_name,
                               dtype=str(dtype).replace("torch.", ""))
                    if run.over(2.0 if B * T > 100_000 else 0.2):
                        results.append(dict(row, ok=None, skipped="budget"))
                        continue
                    if ref_backend == "torch" and T > 2048:
                        results.append(dict(row, ok=None,
                                            skipped="no native float64 reference"))
                        continue
                    try:
                        row.update(scan_case(run, fused_dqo_loss, B, T, layout, opts, dtype,
                                             ref_backend, g))
                    except Exception as e:  # noqa: BLE001
                        row.update(ok=False, error=error_text(e))
                        run.log(traceback.format_exc())
                    results.append(row)
                    if not row.get("ok"):
                        run.log(f"FAIL scan {row}")
        run.log(f"scan ({B}, {T}) done: {sum(1 for r in results if r.get('ok'))} passed so far")


def scan_case(run, fused_dqo_loss, B, T, layout, opts, dtype, ref_backend, g):
    torch = run.torch
    inp = scan_inputs(torch, B, T, layout, opts, dtype, run.device, g)
    sizes = [B * T * 4] * 8 + [B * 4] * 4
    runs = []
    for _ in range(2):
        poison(torch, run.device, sizes)
        runs.append(scan_call(torch, fused_dqo_loss, inp, opts, "triton"))
    run.sync()
    cpu = {k: v.detach().cpu() for k, v in inp.items()}
    ref = scan_call(torch, fused_dqo_loss, cpu, opts, ref_backend, dtype=torch.float64)
    errs, finite, bitwise = {}, True, True
    for k, r in ref.items():
        a, b = runs[0][k], runs[1][k]
        finite &= bool(torch.isfinite(a).all())
        bitwise &= same_bits(a, b)
        errs[k] = rel_err(a.cpu(), r)
    grad_tol = SCAN_GRAD_TOL[str(dtype).replace("torch.", "")]
    tol = {k: grad_tol if k.startswith("grad_") else SCAN_TOL for k in errs}
    worst = max(errs, key=lambda k: errs[k] / tol[k])
    ok = finite and bitwise and all(errs[k] <= tol[k] for k in errs)
    return dict(ok=ok, finite=finite, bitwise=bitwise, rel_err=errs[worst], worst_output=worst,
                tol=tol[worst], rel_err_forward=max(v for k, v in errs.items()
                                                    if not k.startswith("grad_")))


# --------------------------------------------------------------------------------------------
# check: token_logprobs and linear_logprobs

TOKEN_CASES = [  # N, V, dtype, temperature, entropy, inplace_backward
    (1024, 152064, "float32", 0.7, True, False),
    (1024, 152064, "bfloat16", 1.0, True, False),
    (1024, 152064, "bfloat16", 1.3, False, True),
]
TINY_TOKEN_CASES = [(16, 1000, "float32", 0.7, True, False), (8, 3000, "bfloat16", 1.0, True,
                                                                    False),
                    (8, 3000, "bfloat16", 1.3, False, True)]
LOGP_TOL = 2e-5  # fp32 arithmetic on the inputs as given
GRAD_TOL = {"float32": 2e-5, "bfloat16": 8e-3}  # the gradient is stored in the logits' dtype


def token_reference(torch, logits, targets, temp, ignore, up, up_ent, rows=None):
    """float64 logp, entropy and d(sum up logp + up_ent H)/dlogits (optionally of some rows)."""
    sl = slice(None) if rows is None else rows
    z = logits[sl].double().requires_grad_()
    t = targets[sl]
    ign = ignore[sl]
    lsm = torch.log_softmax(z / temp, dim=-1)
    logp = torch.where(ign, 0.0, lsm.gather(1, t.clamp(min=0)[:, None])[:, 0])
    ent = torch.where(ign, 0.0, -(lsm.exp() * lsm).sum(-1))
    (logp * up[sl].double() + ent * up_ent[sl].double()).sum().backward()
    return logp.detach(), ent.detach(), z.grad


def token_case(run, N, V, dtype_name, temp, entropy, inplace, rows=None):
    torch = run.torch
    from dqo_kernels import token_logprobs
    dtype = getattr(torch, dtype_name)
    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(run.args.seed + N + V)
    logits = (2.5 * torch.randn(N, V, device=dev, generator=gen)).to(dtype)
    targets = torch.randint(0, V, (N,), device=dev, generator=gen)
    ignore = torch.rand(N, device=dev, generator=gen) < 0.1
    targets = torch.where(ignore, -100, targets)
    up = torch.randn(N, device=dev, generator=gen)
    up_ent = torch.randn(N, device=dev, generator=gen) if entropy else torch.zeros(N, device=dev)
    outs = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        res = token_logprobs(x, targets, temperature=temp, return_entropy=entropy,
                             inplace_backward=inplace, backend="triton")
        lp, ent = res if entropy else (res, None)
        loss = (lp * up).sum() + ((ent * up_ent).sum() if entropy else 0)
        loss.backward()
        outs.append((lp.detach(), None if ent is None else ent.detach(), x.grad.detach()))
        del x, res, lp, ent, loss
    run.sync()
    sl = slice(None) if rows is None else rows
    r_lp, r_ent, r_grad = token_reference(torch, logits, targets, temp, ignore, up, up_ent, rows)
    lp, ent, grad = outs[0]
    errs = dict(logp=rel_err(lp[sl], r_lp), grad=rel_err(grad[sl], r_grad))
    if entropy:
        errs["entropy"] = rel_err(ent[sl], r_ent)
    ignored_zero = bool((lp[ignore] == 0).all()) and bool((grad[ignore] == 0).all())
    bitwise = all(same_bits(a, b) for a, b in zip(outs[0], outs[1]))
    tol = dict(logp=LOGP_TOL, entropy=LOGP_TOL, grad=GRAD_TOL[dtype_name])
    ok = bitwise and ignored_zero and all(errs[k] <= tol[k] for k in errs)
    return dict(ok=ok, bitwise=bitwise, ignored_rows_zero=ignored_zero, rel_err=errs, tol=tol)


def check_logprobs(run, results):
    cases = TINY_TOKEN_CASES if run.args.tiny else TOKEN_CASES
    for N, V, dt, temp, ent, inplace in cases:
        row = dict(part="token_logprobs", shape=[N, V], dtype=dt, temperature=temp,
                   entropy=ent, inplace_backward=inplace)
        if run.over(5.0):
            results.append(dict(row, ok=None, skipped="budget"))
            continue
        try:
            row.update(token_case(run, N, V, dt, temp, ent, inplace))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=error_text(e))
            run.log(traceback.format_exc())
        results.append(row)
        run.log(f"token_logprobs {row}")
        free(run)
    # Rows past element offset 2^31: N * V > 2^31 (bf16: 5 GB of logits, 5 GB of gradient)
    N, V = 16384, 152064
    row = dict(part="token_logprobs_offsets_over_2^31", shape=[N, V], dtype="bfloat16",
               temperature=1.0, entropy=True, inplace_backward=False)
    first = (2**31) // V - 64  # the rows around and past the offset 2^31
    if run.args.tiny:
        results.append(dict(row, ok=None, skipped="tiny: needs 10 GB on a GPU"))
    elif run.over(20.0):
        results.append(dict(row, ok=None, skipped="budget"))
    else:
        try:
            row.update(token_case(run, N, V, "bfloat16", 1.0, True, False,
                                  rows=slice(first, N)), rows_checked=[first, N])
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=error_text(e))
            run.log(traceback.format_exc())
        results.append(row)
        run.log(f"token_logprobs > 2^31 {row}")
        free(run)


def lm_like(torch, N, D, V, dtype, device, seed, ignore_frac=0.03, scale=3.0):
    """hidden, weight and targets of an LM-like head: logits of std ``scale`` and targets
    sampled from their softmax (not noise on which the target is rarely likely)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, D, device=device, generator=gen).to(dtype)
    w = (torch.randn(V, D, device=device, generator=gen) * (scale / D ** 0.5)).to(dtype)
    targets = torch.empty(N, dtype=torch.long, device=device)
    step = max(1, (2**28) // (V * 4))  # ~256 MiB of fp32 probabilities at a time
    for i in range(0, N, step):
        p = torch.softmax((h[i:i + step] @ w.T).float(), dim=-1)
        targets[i:i + step] = torch.multinomial(p, 1, generator=gen)[:, 0]
        del p
    ignore = torch.rand(N, device=device, generator=gen) < ignore_frac
    return h, w, torch.where(ignore, -100, targets)


def linear_eager(torch, h, w, t, up, fp32=False):
    """Eager torch: logits in bf16 (or fp32), log_softmax in fp32; logp, d_hidden, d_weight."""
    hh = (h.float() if fp32 else h).detach().requires_grad_()
    ww = (w.float() if fp32 else w).detach().requires_grad_()
    lsm = torch.log_softmax((hh @ ww.T).float(), dim=-1)
    logp = torch.where(t == -100, 0.0, lsm.gather(1, t.clamp(min=0)[:, None])[:, 0])
    del lsm
    logp.backward(up)
    return logp.detach(), hh.grad, ww.grad


def check_linear(run, results):
    torch = run.torch
    from dqo_kernels import linear_logprobs
    N, D, V = (64, 32, 1000) if run.args.tiny else (4096, 3584, 152064)
    row = dict(part="linear_logprobs", shape=[N, D, V], dtype="bfloat16",
               rule="rel. error vs fp32 <= 1.5x eager bf16's (logp, d_hidden, d_weight)")
    if run.over(30.0):
        results.append(dict(row, ok=None, skipped="budget"))
        return
    try:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not tf32
        h, w, t = lm_like(torch, N, D, V, torch.bfloat16, run.device, run.args.seed + 1)
        up = torch.randn(N, device=run.device)
        ref = linear_eager(torch, h, w, t, up, fp32=True)
        eager = linear_eager(torch, h, w, t, up)
        eager_err = [rel_err(a, r) for a, r in zip(eager, ref)]
        del eager
        outs = []
        kw = dict(chunk_size=256) if run.args.tiny else {}
        for _ in range(2):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            lp = linear_logprobs(hh, ww, t, backend="triton", **kw)
            lp.backward(up)
            outs.append((lp.detach(), hh.grad, ww.grad))
            del hh, ww, lp
        ours_err = [rel_err(a, r) for a, r in zip(outs[0], ref)]
        bitwise = all(same_bits(a, b) for a, b in zip(*outs))
        names = ("logp", "d_hidden", "d_weight")
        ok = bitwise and all(o <= 1.5 * e + 1e-7 for o, e in zip(ours_err, eager_err))
        row.update(ok=ok, bitwise=bitwise, rel_err=dict(zip(names, ours_err)),
                   eager_bf16_rel_err=dict(zip(names, eager_err)),
                   ratio=dict(zip(names, (o / e if e > 0 else math.inf
                                          for o, e in zip(ours_err, eager_err)))))
        torch.backends.cuda.matmul.allow_tf32 = prev
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=error_text(e))
        run.log(traceback.format_exc())
    results.append(row)
    run.log(f"linear_logprobs {row}")
    free(run)


def free(run):
    gc.collect()
    if run.device.type == "cuda":
        run.torch.cuda.empty_cache()


def section_check(run) -> dict:
    results = []
    for part in (check_scan, check_logprobs, check_linear):
        try:
            part(run, results)
        except Exception as e:  # noqa: BLE001  (a broken part is a failed row)
            results.append(dict(part=part.__name__, ok=False, error=error_text(e)))
            run.log(traceback.format_exc())
        free(run)
    counts = dict(passed=sum(r.get("ok") is True for r in results),
                  failed=sum(r.get("ok") is False for r in results),
                  skipped=sum(r.get("ok") is None for r in results))
    run.log(f"check: {counts}")
    return dict(counts=counts, rows=results)


# --------------------------------------------------------------------------------------------
# bench


class Timer:
    """CUDA-event timing: median of repetitions, L2 flushed before each (outside the events).
    On CPU (``--tiny``: the bench code runs once, its timings mean nothing) a host clock."""

    def __init__(self, run):
        self.run, self.torch = run, run.torch
        self.cuda = run.device.type == "cuda"
        self.flush = self.torch.empty(256 * 2**20 if self.cuda else 1, dtype=self.torch.int8,
                                      device=run.device)

    def __call__(self, fn, min_reps=5, max_reps=100, target_s=0.6, warmup=2):
        torch = self.torch
        if not self.cuda:
            min_reps, max_reps, target_s, warmup = 1, 1, 0.0, 0
        for _ in range(warmup):
            fn()
        self.run.sync()
        times = []
        t_start = time.monotonic()
        while len(times) < max_reps and (len(times) < min_reps
                                         or time.monotonic() - t_start < target_s):
            self.flush.zero_()
            if not self.cuda:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times), len(times)

    def peak_mib(self, fn):
        torch = self.torch
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_rates(run, timer) -> dict:
    torch = run.torch
    n = 2**30 if run.device.type == "cuda" else 2**22
    a = torch.rand(n // 4, device=run.device)
    b = torch.empty_like(a)
    ms, _ = timer(lambda: b.copy_(a), min_reps=10, max_reps=30)
    bw = 2 * n / (ms / 1e3) / 1e9  # bytes read + written
    k = 8192 if run.device.type == "cuda" else 128
    x = torch.randn(k, k, device=run.device, dtype=torch.bfloat16)
    y = torch.randn(k, k, device=run.device, dtype=torch.bfloat16)
    ms, _ = timer(lambda: x @ y, min_reps=5, max_reps=20)
    return dict(copy_GBps=bw, copy_bytes=2 * n, bf16_matmul_TFLOPs=2 * k ** 3 / (ms / 1e3) / 1e12,
                matmul_size=k)


def bench_row(run, timer, rows, base, fn, floor_ms=None, check=None, est_s=2.0, sub_ms=0.0):
    """Time ``fn`` (a zero-argument step) and record a row; ``check()`` returns errors against
    ours; a failure is a row with its error."""
    row = dict(base)
    if run.over(est_s):
        rows.append(dict(row, ms=None, skipped="budget"))
        return row
    try:
        ms, reps = timer(fn)
        ms = ms - sub_ms
        row.update(ms=ms, reps=reps, peak_MiB=timer.peak_mib(fn))
        if sub_ms:
            row["subtracted_ms"] = sub_ms
        if floor_ms:
            row.update(floor_ms=floor_ms, floor_pct=100 * floor_ms / ms if ms > 0 else None)
        if check is not None:
            row["vs_ours"] = check()
    except Exception as e:  # noqa: BLE001
        row.update(ms=None, failed=error_text(e))
        run.log(traceback.format_exc(limit=3))
    rows.append(row)
    run.log(f"bench {row}")
    free(run)
    return row


def bench_scan(run, timer, rates, rows):
    for B, T in ((2, 40), (3, 70)) if run.args.tiny else ((16, 2048), (64, 8192), (2, 32768)):
        bench_scan_shape(run, timer, rates, rows, B, T)
        free(run)


def bench_scan_shape(run, timer, rates, rows, B, T):
    torch = run.torch
    import dqo_kernels
    from dqo_kernels import fused_dqo_loss
    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(B * T)
    # ragged rows with environment tokens, made on the GPU
    lengths = torch.randint(T // 4, T + 1, (B, 1), device=dev, generator=gen)
    pos = torch.arange(T, device=dev)[None]
    mask = (pos < lengths) & (torch.rand(B, T, device=dev, generator=gen) > 0.1)
    logp = -3 * torch.rand(B, T, device=dev, generator=gen)
    ref = (logp + 0.05 * torch.randn(B, T, device=dev, generator=gen)).clamp(max=0)
    values = torch.randn(B, T, device=dev, generator=gen)
    rewards = torch.where(pos == lengths - 1, 1.0, 0.0) * mask
    elem = 4
    scan_bytes = B * T * (4 * elem + 1 + 5 * 4)  # read 4 inputs + mask; write 5 outputs
    step_bytes = B * T * (4 * elem + 1 + 3 * 4 + 2 * elem)  # + diagnostics, 2 gradients
    floor = lambda nbytes: nbytes / (rates["copy_GBps"] * 1e9) * 1e3  # noqa: E731
    base = dict(op="dqo_scan", shape=[B, T], dtype="float32")

    def scan_only():
        from dqo_kernels.dqo_loss.aggregation import RowScale
        from dqo_kernels.dqo_loss.launch import DQOHyper
        from dqo_kernels.dqo_loss.triton import dqo_loss_forward
        return dqo_loss_forward(logp, ref, values, rewards, mask, None, None,
                                RowScale(mask, "token-mean", None), DQOHyper(), None)
    bench_row(run, timer, rows, dict(base, impl="scan kernel (launcher)",
                                     floor_bytes=scan_bytes), scan_only, floor(scan_bytes))
    lp = logp.clone().requires_grad_()
    v = values.clone().requires_grad_()

    def step():
        lp.grad = v.grad = None
        fused_dqo_loss(lp, ref, v, rewards, mask, backend="triton").loss.backward()
    for checks in (True, False):
        dqo_kernels.set_data_checks(checks)
        try:
            bench_row(run, timer, rows,
                      dict(base, impl=f"fused_dqo_loss fwd+bwd, data checks "
                                      f"{'on' if checks else 'off'}",
                           floor_bytes=step_bytes), step, floor(step_bytes))
        finally:
            dqo_kernels.set_data_checks(True)


def bench_token(run, timer, rates, rows):
    torch = run.torch
    from peers import installed

    from dqo_kernels import token_logprobs
    N, V = (32, 3000) if run.args.tiny else (8192, 152064)
    dev = run.device
    gen = torch.Generator(device=dev).manual_seed(7)
    logits = (3.0 * torch.randn(N, V, device=dev, generator=gen)).to(torch.bfloat16)
    targets = torch.empty(N, dtype=torch.long, device=dev)
    for i in range(0, N, 512):  # sampled from the softmax
        targets[i:i + 512] = torch.multinomial(torch.softmax(logits[i:i + 512].float(), -1), 1,
                                               generator=gen)[:, 0]
    up = torch.randn(N, device=dev, generator=gen)
    floor_bytes = 3 * N * V * 2
    floor_ms = floor_bytes / (rates["copy_GBps"] * 1e9) * 1e3
    base = dict(op="token_logprobs", shape=[N, V], dtype="bfloat16", floor_bytes=floor_bytes)
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, targets, backend="triton")
    lp.backward(up)
    ours = (lp.detach(), x.grad.detach())
    del x, lp

    def make(impl):
        if impl == "ours":
            x = logits.clone().requires_grad_()

            def step():
                x.grad = None
                token_logprobs(x, targets, backend="triton").backward(up)
            return step, None
        if impl == "eager":
            x = logits.clone().requires_grad_()

            def f():
                return torch.log_softmax(x.float(), -1).gather(1, targets[:, None])[:, 0]

            def step():
                x.grad = None
                f().backward(up)

            def out():
                step()
                return f().detach(), x.grad
            return step, out
        if impl == "liger_ce":  # Liger writes its gradient over the logits: a fresh copy each
            from liger_kernel.transformers import LigerCrossEntropyLoss
            ce = LigerCrossEntropyLoss(reduction="none")

            def step():
                x = logits.clone().requires_grad_()
                (-ce(x, targets)).backward(up)

            def out():
                x = logits.clone().requires_grad_()
                lp = -ce(x, targets)
                lp.backward(up)
                return lp.detach(), x.grad
            return step, out
        raise ValueError(impl)

    clone_ms = None
    for impl in ("ours", "eager", "liger_ce"):
        if impl == "liger_ce" and not installed("liger_kernel"):
            rows.append(dict(base, impl=impl, ms=None, failed="not installed"))
            continue
        try:
            step, out = make(impl)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(base, impl=impl, ms=None, failed=error_text(e)))
            continue
        sub = 0.0
        if impl == "liger_ce":
            if clone_ms is None:
                clone_ms = timer(lambda: logits.clone())[0]
            sub = clone_ms

        def check(out=out):
            lp, grad = out()
            errs = dict(logp_max_abs=max_abs(lp, ours[0]))
            if grad is not None:
                errs["grad_rel"] = rel_err(grad, ours[1])
            return errs
        bench_row(run, timer, rows, dict(base, impl=impl), step, floor_ms,
                  check=None if impl == "ours" else check, sub_ms=sub)
        del step, out
        free(run)


def bench_linear(run, timer, rates, rows):
    torch = run.torch
    from peers import installed

    from dqo_kernels import linear_logprobs
    N, D, V = (64, 32, 1000) if run.args.tiny else (16384, 3584, 152064)
    dev = run.device
    h, w, t = lm_like(torch, N, D, V, torch.bfloat16, dev, seed=11, ignore_frac=0.02)
    up = torch.randn(N, device=dev)
    flops = 6 * N * D * V
    nbytes = (2 * V * D + 2 * N * D) * 2
    floor_ms = max(flops / (rates["bf16_matmul_TFLOPs"] * 1e12),
                   nbytes / (rates["copy_GBps"] * 1e9)) * 1e3
    base = dict(op="linear_logprobs", shape=[N, D, V], dtype="bfloat16", floor_flops=flops,
                floor_bytes=nbytes)

    def fns(impl):
        if impl == "ours":
            kw = dict(chunk_size=256) if run.args.tiny else {}
            return lambda hh, ww: linear_logprobs(hh, ww, t, backend="triton", **kw)
        if impl == "eager":
            return lambda hh, ww: torch.where(
                t == -100, 0.0, torch.log_softmax((hh @ ww.T).float(), -1).gather(
                    1, t.clamp(min=0)[:, None])[:, 0])
        if impl == "cce":
            from cut_cross_entropy import linear_cross_entropy
            return lambda hh, ww: -linear_cross_entropy(hh, ww, t, reduction="none")
        if impl == "liger_flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
            return lambda hh, ww: -ce(ww, hh, t)
        raise ValueError(impl)

    def outputs(f):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp = f(hh, ww)
        lp.backward(up)
        return lp.detach(), hh.grad, ww.grad

    ours = None
    for impl in ("ours", "cce", "liger_flce", "eager"):
        mod = {"cce": "cut_cross_entropy", "liger_flce": "liger_kernel"}.get(impl)
        if mod and not installed(mod):
            rows.append(dict(base, impl=impl, ms=None, failed="not installed"))
            continue
        if run.over(15.0):
            rows.append(dict(base, impl=impl, ms=None, skipped="budget"))
            continue
        try:
            f = fns(impl)
            if ours is None and impl == "ours":
                ours = outputs(f)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(base, impl=impl, ms=None, failed=error_text(e)))
            run.log(traceback.format_exc(limit=3))
            continue
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def step(f=f, hh=hh, ww=ww):
            hh.grad = ww.grad = None
            f(hh, ww).backward(up)

        def check(f=f, ours=ours):
            lp, dh, dw = outputs(f)
            return dict(logp_max_abs=max_abs(lp, ours[0]), d_hidden_rel=rel_err(dh, ours[1]),
                        d_weight_rel=rel_err(dw, ours[2]))
        bench_row(run, timer, rows, dict(base, impl=impl), step, floor_ms,
                  check=None if impl == "ours" or ours is None else check, est_s=15.0)
        del hh, ww, step
        free(run)


def section_bench(run) -> dict:
    if run.device.type != "cuda" and not run.args.tiny:
        run.log("bench: skipped (no CUDA device)")
        return dict(skipped="no CUDA device", rows=[])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py
    timer = Timer(run)
    rates = measure_rates(run, timer)
    run.log(f"rates {rates}")
    rows = []
    for part in (bench_scan, bench_token, bench_linear):
        try:
            part(run, timer, rates, rows)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(op=part.__name__, ms=None, failed=error_text(e)))
            run.log(traceback.format_exc())
        free(run)
    return dict(rates=rates, rows=rows)


# --------------------------------------------------------------------------------------------
# summary


def fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary(env, check, bench) -> str:
    lines = ["# GPU check", "",
             f"`{env['command']}` on {env.get('device')} (driver {env.get('driver', '-')}, "
             f"CUDA {env.get('cuda')}), torch {env['torch']}, Triton {env['triton']}, "
             f"Python {env['python']}, {env['started']}; Liger {env['liger_kernel']}, "
             f"CCE {env['cut_cross_entropy']}; commit {env.get('commit')}.", ""]
    if check is not None:
        c = check["counts"]
        lines += ["## check", "",
                  f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped.", ""]
        fails = [r for r in check["rows"] if r.get("ok") is False]
        if fails:
            lines += ["| part | case | error |", "|---|---|---|"]
            for r in fails[:40]:
                case = {k: v for k, v in r.items() if k in ("shape", "layout", "options",
                                                             "dtype")}
                err = r.get("error") or {k: r.get(k) for k in ("rel_err", "bitwise", "finite",
                                                                "ignored_rows_zero")
                                         if k in r}
                lines.append(f"| {r.get('part')} | {case} | {err} |")
            lines.append("")
        for r in check["rows"]:
            if r.get("part", "").startswith(("token", "linear")) and r.get("ok") is not None:
                lines.append(f"- {r['part']} {r.get('shape')} {r.get('dtype')}: "
                             f"{'ok' if r['ok'] else 'FAILED'}, rel. error {r.get('rel_err')}"
                             + (f" (eager bf16: {r['eager_bf16_rel_err']})"
                                if "eager_bf16_rel_err" in r else ""))
        skipped = sorted({r["skipped"] for r in check["rows"] if r.get("skipped")})
        if skipped:
            lines.append(f"- skipped: {', '.join(skipped)}")
        lines.append("")
    if bench is not None:
        lines += ["## bench", ""]
        if bench.get("skipped"):
            lines += [f"skipped: {bench['skipped']}", ""]
        else:
            r = bench["rates"]
            lines += [f"copy {r['copy_GBps']:.0f} GB/s (read + write), bf16 matmul "
                      f"{r['bf16_matmul_TFLOPs']:.0f} TFLOP/s ({r['matmul_size']}^3), measured in "
                      "this run" + (" (--tiny: toy sizes on CPU, timings mean nothing)."
                                    if env.get("interpreter") else "."),
                      "", "| op | shape | impl | ms | floor ms | floor % | peak MiB | vs ours |",
                      "|---|---|---|---:|---:|---:|---:|---|"]
            for row in bench["rows"]:
                ms = row.get("ms")
                cell = fmt(ms) if ms is not None else (
                    f"failed: {row['failed']}" if row.get("failed") else
                    f"skipped: {row.get('skipped')}")
                lines.append(f"| {row.get('op')} | {row.get('shape', '')} | "
                             f"{row.get('impl', '')} | {cell} | {fmt(row.get('floor_ms'))} | "
                             f"{fmt(row.get('floor_pct'), '.0f')} | "
                             f"{fmt(row.get('peak_MiB'), '.0f')} | {row.get('vs_ours', '')} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
        if os.environ["TRITON_INTERPRET"] != "1":
            sys.exit("gpu_check.py --tiny: runs in the Triton interpreter (TRITON_INTERPRET=1)")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_check.py: unset TRITON_INTERPRET, or pass --tiny")
    import torch
    sys.path.insert(0, str(ROOT))  # this checkout's dqo_kernels
    run = Run(args, torch)
    if run.device.type != "cuda" and not args.tiny:
        run.log("no CUDA device: the check half runs nothing without --tiny")
    torch.manual_seed(args.seed)
    env = environment(args, torch)
    run.log(f"environment {env}")
    check = bench = None
    if "check" in args.sections:
        if run.device.type == "cuda" or args.tiny:
            full = args.budget
            if "bench" in args.sections:
                run.deadline = CHECK_SHARE * args.budget
            check = section_check(run)
            run.deadline = full
        else:
            check = dict(counts=dict(passed=0, failed=0, skipped=1),
                         rows=[dict(part="all", ok=None, skipped="no CUDA device")])
        check["environment"] = env
        (args.out / "check.json").write_text(json.dumps(check, indent=1, default=str))
    if "bench" in args.sections:
        bench = section_bench(run)
        bench["environment"] = env
        (args.out / "bench.json").write_text(json.dumps(bench, indent=1, default=str))
    text = summary(env, check, bench)
    (args.out / "summary.md").write_text(text + "\n")
    run.log(f"done in {run.elapsed():.1f} s\n{text}")
    run.log_file.close()
    return 1 if check is not None and check["counts"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
