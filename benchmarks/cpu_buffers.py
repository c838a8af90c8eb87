"""Where the CPU time of token_logprobs goes: the kernels against the first touch of the
gradient buffer they write into (benchmarks/NOTES.md, 2026-11-24).

    python benchmarks/cpu_buffers.py [--n 1024] [--v 32000]

Times, in one process, the native forward and the backward written into (a) a buffer reused
across calls, (b) a fresh ``torch.empty`` buffer per call (4 KiB pages: one fault and one
kernel zero-fill per page), (c) a fresh huge-page buffer per call (what the library uses),
and prints the first calls of (c) apart, since the kernel has to assemble huge pages first.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from dqo_kernels._native import load as native  # noqa: E402
from dqo_kernels.logprobs import cpp as logprobs_cpp  # noqa: E402


def times_ms(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    if not native.is_available():
        raise SystemExit("the native CPU kernels could not be built here")
    x = torch.randn(args.n, args.v)
    y = torch.randint(0, args.v, (args.n,))
    g = torch.randn(args.n)
    lse, _, _ = logprobs_cpp.lse_forward(x, y, 0, 1.0, False)
    reused = torch.empty_like(x)

    def bwd(out_fn):
        return lambda: logprobs_cpp.logits_grad(x, y, lse, g, 0, 1.0, out_fn())

    huge_first = times_ms(bwd(lambda: logprobs_cpp.empty(x.shape, x.dtype)), 8)
    rows = [("forward (lse_forward)", lambda: logprobs_cpp.lse_forward(x, y, 0, 1.0, False)),
            ("backward, reused buffer", bwd(lambda: reused)),
            ("backward, fresh torch.empty buffer", bwd(lambda: torch.empty_like(x))),
            ("backward, fresh huge-page buffer", bwd(lambda: logprobs_cpp.empty(x.shape,
                                                                                x.dtype)))]
    print(f"N={args.n}, V={args.v}, fp32, {torch.get_num_threads()} threads: median ms of "
          f"{args.reps} calls")
    for name, fn in rows:
        fn()
        print(f"  {name:36s} {statistics.median(times_ms(fn, args.reps)):8.2f}")
    print("  first 8 calls into fresh huge-page buffers: "
          + " ".join(f"{t:.1f}" for t in huge_first))


if __name__ == "__main__":
    main()
