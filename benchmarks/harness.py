"""The measurement shared by every benchmark case: timing, peak memory (the CUDA allocator's,
or on CPU the peak RSS of a probe subprocess), the machine's copy bandwidth and matmul rate
behind the roofline floors, and the memory budget that skips what would not fit.

Used by ``run.py`` (the command line), ``bench_ops.py`` (pytest-benchmark) and ``busy.py``.
Importing it puts this checkout's ``dqo_kernels`` first on ``sys.path`` and refuses the Triton
interpreter, whose timings mean nothing.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks: refusing to time the Triton interpreter (TRITON_INTERPRET=1)")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
import dqo_kernels  # noqa: E402

RUN = Path(__file__).resolve().with_name("run.py")  # the probes' entry point


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
    implementation (inputs, imports, set-up) but does not run it (``run.py --probe``)."""
    def run(what):
        cmd = [sys.executable, str(RUN), "--probe", json.dumps([op, what, shape])]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    peak, base = run(impl), run(f"built-only:{impl}")
    return None if peak is None or base is None else max(0.0, peak - base)


def probe_peak_mib(step) -> float:
    """In a probe subprocess: this process's peak RSS (MiB) over a second run of ``step``, or
    over building it alone when ``step`` is None."""
    import resource
    if step is not None:
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
    return hwm / 1024


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


def roofline_ms(rates, nbytes: float = 0.0, flops: float = 0.0) -> float:
    """The floor of a step that moves ``nbytes`` and computes ``flops`` (matmul): the larger
    of its time at the measured copy bandwidth and at the measured matmul rate."""
    bw, mm = rates["bandwidth_GBps"] * 1e9, rates["matmul_TFLOPs"] * 1e12
    return max(flops / mm, nbytes / bw) * 1e3


def available_bytes(device) -> Optional[float]:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024.0 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
