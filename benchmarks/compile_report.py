"""Compile every Triton kernel of dqo_kernels ahead of time for NVIDIA GPUs, without a GPU, with
the specializations its launcher really gives it.

    python benchmarks/compile_report.py                 # sm_90 (H100/H200)
    python benchmarks/compile_report.py --arch 80,90 --json report.json --md report.md

The kernels are not described by hand. Each case calls a public op, forward and backward,
with ``backend="triton"`` (``fused_dqo_loss``, ``token_logprobs``) on CPU tensors shaped and
typed as a training step passes them, through the launchers of ``dqo_loss/triton.py`` and
``logprobs/triton.py``, with every Triton kernel's ``run`` replaced by a recorder: each launch is
captured (grid, positional and keyword arguments, ``num_warps``), not executed (the launchers
themselves are the fallback where the public op launches nothing). Triton's own binder then
specializes the captured arguments as a launch on a GPU would (dtypes of the pointers,
pointers and integers divisible by 16, integers equal to 1, the constexprs such as the block
size), and ``triton.compile`` lowers that variant to PTX and a cubin for each architecture with
the ptxas bundled in the wheel. So the block sizes and warps in the report are the launchers'
current choices, whatever they become.

Reported per variant: registers, spills (local memory) and shared memory (cuobjdump), and the
global loads and stores in the PTX by width (``ld.global.v4`` / ``.v2`` / scalar): the vector
widths say whether the loads of a tile are coalesced 8/16-byte accesses. Compiled, never run:
numerical correctness on a GPU is ``gpu_check.py``'s job.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dqo_kernels import fused_dqo_loss, token_logprobs  # noqa: E402
from dqo_kernels.dqo_loss import triton as dqo_triton  # noqa: E402
from dqo_kernels.dqo_loss.aggregation import RowScale  # noqa: E402
from dqo_kernels.dqo_loss.launch import DQOHyper  # noqa: E402
from dqo_kernels.logprobs import triton as lp_triton  # noqa: E402

V_QWEN = 152064  # Qwen2-7B's vocabulary


# --------------------------------------------------------------------------------------------
# The launches, captured


def kernels():
    """Every Triton kernel defined in the launcher modules."""
    out = {}
    for mod in (dqo_triton, lp_triton):  # a helper imported into both counts once
        out.update({id(v): v for v in vars(mod).values() if isinstance(v, JITFunction)})
    return list(out.values())


@contextlib.contextmanager
def recording():
    """Replace every kernel's ``run`` by a recorder of its launches (nothing is launched)."""
    calls = []
    patched = []
    for k in kernels():
        def record(*args, grid, warmup, _k=k, **kwargs):
            calls.append(dict(kernel=_k, args=args, kwargs=kwargs, grid=grid))
        k.run = record
        patched.append(k)
    # the launches are made with CPU tensors: choose the configurations a CUDA device gets
    fwd_config = lp_triton.fwd_config
    lp_triton.fwd_config = lambda V, device: fwd_config(V, torch.device("cuda"))
    try:
        yield calls
    finally:
        lp_triton.fwd_config = fwd_config
        for k in patched:
            del k.run


def capture(launch, fallback=None):
    """The kernel launches ``launch()`` makes. The public ops refuse CPU tensors for the Triton
    backend unless the interpreter is on, which only their check reads at call time (the
    kernels were compiled-mode ``JITFunction``s at import): it is set for the call. A device
    guard that refuses CPU tensors is bypassed. If the public op launched nothing (a path this
    script does not know), ``fallback()`` (the launcher called directly) is captured."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for via, attempt in (("public op", launch), ("launcher", fallback)):
            if attempt is None:
                continue
            with recording() as calls:
                try:
                    attempt()
                except Exception:  # noqa: BLE001
                    calls.clear()
                    with unittest_patch(torch.cuda, "device",
                                        lambda *a, **k: contextlib.nullcontext()):
                        attempt()
            if calls:
                return [dict(c, via=via) for c in calls]
        return []
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def unittest_patch(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def dqo_inputs(B, T, dtype, all_options):
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(B, T, generator=g)).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.2
    x = dict(logp=lp, ref_logp=lp.clone(), values=torch.randn(B, T, generator=g).to(dtype),
             rewards=torch.zeros(B, T, dtype=dtype), mask=mask, behavior_logp=None,
             bootstrap=None)
    if all_options:
        x.update(behavior_logp=lp.clone(), bootstrap=torch.zeros(B, dtype=dtype))
    return x


def dqo_case(B, T, dtype, all_options):
    """``fused_dqo_loss(..., backend="triton")`` with its data checks as set (on by default),
    forward and backward; the launcher directly as the fallback."""
    x = dqo_inputs(B, T, dtype, all_options)
    opts = dict(lam=0.95, gamma=0.99, is_clip=2.0, target_grad=True) if all_options else {}

    def public():
        lp = x["logp"].clone().requires_grad_()
        v = x["values"].clone().requires_grad_()
        out = fused_dqo_loss(lp, x["ref_logp"], v, x["rewards"], x["mask"],
                             behavior_logp=x["behavior_logp"], bootstrap=x["bootstrap"],
                             backend="triton", **opts)
        out.loss.backward()

    def launcher():
        dqo_triton.dqo_loss_forward(
            x["logp"], x["ref_logp"], x["values"], x["rewards"], x["mask"], x["behavior_logp"],
            x["bootstrap"], RowScale(x["mask"], "token-mean", None), DQOHyper(**opts), None)
    return public, launcher


def token_case(N, V, dtype, entropy):
    """``token_logprobs(..., backend="triton")`` forward and backward (the forward and the
    backward kernel); the launchers directly as the fallback."""
    logits = torch.randn(N, V).to(dtype)
    targets = torch.randint(0, V, (N,))

    def public():
        x = logits.clone().requires_grad_()
        out = token_logprobs(x, targets, return_entropy=entropy, backend="triton")
        (out[0].sum() + out[1].sum() if entropy else out.sum()).backward()

    def launcher():
        lp_triton.lse_forward(logits, targets, 0, 1.0, entropy)
        ent = dict(grad_ent=torch.ones(N), entropy=torch.ones(N)) if entropy else {}
        lp_triton.logits_grad(logits, targets, torch.zeros(N), torch.ones(N), 0, 1.0,
                              torch.empty_like(logits), **ent)
    return public, launcher


def cases():
    """(label, launch): the calls a training step makes. The DQO loss at [16, 2048] (rows of
    several production tiles), also with T = 1000 (strides not divisible by 16) and T = 40 (a
    short tile); the log-prob kernels at Qwen2-7B's vocabulary, 16 rows."""
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    yield "dqo_loss [16, 2048] fp32", dqo_case(16, 2048, f32, False)
    yield "dqo_loss [16, 2048] bf16", dqo_case(16, 2048, bf16, False)
    yield "dqo_loss [16, 2048] fp32, every option", dqo_case(16, 2048, f32, True)
    yield "dqo_loss [16, 2048] fp64, every option", dqo_case(16, 2048, f64, True)
    yield "dqo_loss [16, 1000] fp32", dqo_case(16, 1000, f32, False)
    yield "dqo_loss [16, 40] fp32", dqo_case(16, 40, f32, False)
    for dt in (f32, bf16):
        name = "fp32" if dt == f32 else "bf16"
        for ent in (False, True):
            yield (f"token_logprobs [16, {V_QWEN}] {name}{', entropy' if ent else ''}",
                   token_case(16, V_QWEN, dt, ent))


# --------------------------------------------------------------------------------------------
# Compiling a captured launch as the launch would


def specialize(call, target):
    """(signature, constexprs, attrs, options) of a captured launch on ``target``, by Triton's
    own binder (the code path of ``JITFunction.run``)."""
    k = call["kernel"]
    backend = make_backend(target)
    kwargs = dict(call["kwargs"])
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound_args, specialization, options = binder(*call["args"], **kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound_args,
                                                         specialization, options)
    return signature, constexprs, attrs, options


def describe(call, signature, constexprs, attrs) -> dict:
    """The launch in words: its constexprs, which arguments were specialized how."""
    k = call["kernel"]
    names = [p.name for p in k.params]
    const = {names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
    spec_attrs = {names[p[0]]: v for p, v in attrs.items() if len(p) == 1}
    div16 = sorted(n for n, a in spec_attrs.items() if any("divisibility" in str(x) for x in a))
    is_one = sorted(n for n in names if n in const and not k.params[names.index(n)].is_constexpr)
    flags = {n: v for n, v in const.items() if k.params[names.index(n)].is_constexpr}
    dtypes = sorted({t for n, t in signature.items() if t.startswith("*")})
    return dict(flags={n: (str(v) if not isinstance(v, (bool, int, float)) else v)
                       for n, v in flags.items()},
                ints_equal_1=is_one, divisible_by_16=div16, pointer_types=dtypes)


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+)\s+LOCAL:(\d+)", out)
    return dict(regs=int(m[1]), shared=int(m[2]), local=int(m[3])) if m else {}


def memory_ops(ptx: str) -> dict:
    """Global loads and stores in the PTX, by vector width."""
    out = {}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(?:\.[a-zA-Z0-9_:]+)*", ptx)
        out[op] = dict(v4=sum(".v4." in f + "." for f in found),
                       v2=sum(".v2." in f + "." for f in found))
        out[op]["scalar"] = len(found) - out[op]["v4"] - out[op]["v2"]
    return out


def compile_all(archs, log=print):
    rows = []
    captured = []
    for label, (public, launcher) in cases():
        calls = capture(public, launcher)
        if not calls:
            raise RuntimeError(f"{label}: no Triton kernel launched")
        captured += [(label, call) for call in calls]
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for label, call in captured:
            t0 = time.time()
            signature, constexprs, attrs, options = specialize(call, target)
            src = ASTSource(fn=call["kernel"], signature=signature, constexprs=constexprs,
                            attrs=attrs)
            compiled = triton.compile(src, target=target, options=options.__dict__)
            k = call["kernel"]
            grid = call["grid"]
            rows.append(dict(case=label, kernel=k.__name__, arch=f"sm_{arch}", via=call["via"],
                             grid=list(grid) if isinstance(grid, (tuple, list)) else str(grid),
                             num_warps=options.num_warps, num_stages=options.num_stages,
                             **describe(call, signature, constexprs, attrs),
                             **resource_usage(compiled.asm["cubin"]),
                             memory=memory_ops(compiled.asm["ptx"])))
            log(f"{rows[-1]['arch']} {label} {k.__name__}: {time.time() - t0:.1f} s")
    return rows


def block_flags(r) -> str:
    """The constexprs of a row, block sizes first."""
    f = r["flags"]
    blocks = [f"{n}={v}" for n, v in f.items() if n.startswith("B")]
    rest = [f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in f.items()
            if not n.startswith("B") and n != "ACC"]
    return ", ".join(blocks + rest)


def ld_cell(m) -> str:
    return f"{m['v4']}/{m['v2']}/{m['scalar']}"


def markdown(rows, header=True) -> str:
    lines = []
    if header:
        lines += [f"triton {triton.__version__}, torch {torch.__version__}", ""]
    lines += ["| arch | case | kernel | constexprs | warps | regs | spill B | shared B | "
              "ld v4/v2/scalar | st v4/v2/scalar |",
              "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['case']} | {r['kernel']} | {block_flags(r)} | "
                     f"{r['num_warps']} | {r.get('regs', '?')} | {r.get('local', '?')} | "
                     f"{r.get('shared', '?')} | {ld_cell(r['memory']['ld'])} | "
                     f"{ld_cell(r['memory']['st'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,90")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    rows = compile_all([int(a) for a in args.arch.split(",")],
                       log=lambda m: print(m, file=sys.stderr))
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, torch=torch.__version__,
                                             rows=rows), indent=1))
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
