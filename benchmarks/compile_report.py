"""Compile every Triton kernel of dqo_kernels ahead of time for NVIDIA GPUs, without a GPU.

    python benchmarks/compile_report.py                 # sm_90 (H100/H200)
    python benchmarks/compile_report.py --arch 80,90 --json report.json

Triton lowers each kernel variant (dtype x constexpr flags) through TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas bundled in its wheel, and cuobjdump reports registers, spills
(local memory) and shared memory per kernel. This catches what the interpreter cannot:
compile errors, codegen of the tuple scans, register pressure and spills. It does not run the
kernels; numerical correctness on a GPU is the test suite's job there.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dqo_kernels.dqo_loss.triton import dqo_loss_fwd_kernel  # noqa: E402
from dqo_kernels.logprobs.triton import logprobs_bwd_kernel, logprobs_fwd_kernel  # noqa: E402

INPUTS = {"logp", "ref_logp", "behavior_logp", "values", "rewards", "bootstrap", "logits",
          "dlogits"}
INT_PTRS = {"targets": "*i64", "mask": "*u8"}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INPUTS:
            sig[name] = f"*{dtype}"
        elif name in INT_PTRS:
            sig[name] = INT_PTRS[name]
        elif name.startswith("s_"):
            sig[name] = "i64"
        elif name in ("T", "V", "v0"):
            sig[name] = "i32"
        elif name in ("beta", "gamma", "lam", "log_cap", "inv_temp"):
            sig[name] = "fp32"
        else:  # outputs and per-row buffers
            sig[name] = "*fp64" if dtype == "fp64" else "*fp32"
    return sig


def variants():
    flags = ("HAS_BEHAVIOR", "HAS_BOOTSTRAP", "HAS_CLIP", "IS_POLICY", "IS_VALUE", "TARGET_GRAD")
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        acc = tl.float64 if dt == "fp64" else tl.float32
        for on in ((True, False) if dt == "fp32" else (True,)):
            c = dict({f: on for f in flags}, ACC=acc, BT=1024)
            yield "dqo_scan_fwd", dqo_loss_fwd_kernel, dt, c, 4
    for dt in ("fp32", "bf16", "fp16"):
        for on in (True, False):
            yield "logprobs_fwd", logprobs_fwd_kernel, dt, dict(HAS_EZ=on, BV=1024), 4
            yield "logprobs_bwd", logprobs_bwd_kernel, dt, dict(HAS_ENT=on, BV=1024), 4


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+)\s+LOCAL:(\d+)", out)
    return dict(regs=int(m[1]), shared=int(m[2]), local=int(m[3])) if m else {}


def compile_all(archs):
    rows = []
    for arch in archs:
        for name, kernel, dt, consts, warps in variants():
            sig = signature(kernel, dt, consts)
            params = list(sig)
            src = ASTSource(fn=kernel, signature=sig,
                            constexprs={(params.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps})
            flags = ",".join(f"{key}={v}" for key, v in consts.items()
                             if isinstance(v, bool)) or "-"
            rows.append(dict(kernel=name, arch=f"sm_{arch}", dtype=dt, flags=flags,
                             num_warps=warps, **resource_usage(k.asm["cubin"])))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,90")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = compile_all([int(a) for a in args.arch.split(",")])
    print(f"triton {triton.__version__}")
    print("| kernel | arch | dtype | warps | regs | local (spill) B | shared B | flags |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['num_warps']} | "
              f"{r.get('regs', '?')} | {r.get('local', '?')} | {r.get('shared', '?')} | "
              f"{r['flags']} |")
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
