"""How much each op slows down when another process keeps a core busy.

    python benchmarks/busy.py              # each op, quiet vs beside one busy process
    python benchmarks/busy.py --default    # also `python -m dqo.train` (minutes)

A kernel that spin-waits, or splits its work over more threads than there are free cores,
slows down far more than the fair share (2x on a 2-core machine with one other busy process;
an OpenMP pool used to make fused_dqo_loss 450x slower here). Each op is timed in this
process, median of repeated forward+backward steps, first with the machine quiet and then
beside ``python -c "while True: pass"``; the slowdown is the ratio. Run it on an otherwise
idle machine: the load average at start is printed and recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this checkout's dqo_kernels; the timing of run.py)
import torch  # noqa: E402
from cases import build  # noqa: E402  (the same inputs and steps as run.py)

RESULTS = Path(__file__).resolve().parent / "results"

JOBS = [("dqo_loss", [16, 4096]), ("dqo_loss", [2, 1024]), ("token_logprobs", [1024, 32000]),
        ("linear_logprobs", [1024, 512, 32000])]


def busy():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_default(extra=()) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dqo.train", "--no-progress", "--overwrite",
                    "--out", "runs/busy-default", *extra], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--default", action="store_true", help="also time python -m dqo.train")
    p.add_argument("--adapt-threads", action="store_true",
                   help="time python -m dqo.train --adapt-threads (threads fitted to the load)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f}; {torch.get_num_threads()} threads")
    cpu = torch.device("cpu")
    rows = []
    for op, shape in JOBS:
        step = build(op, "ours", shape, cpu, torch.float32)
        quiet = harness.time_ms(step, cpu, args.reps)
        hog = busy()
        try:
            time.sleep(0.5)  # the hog is running
            loaded = harness.time_ms(step, cpu, args.reps)
        finally:
            hog.kill()
            hog.wait()
        rows.append(dict(op=op, shape=shape, quiet_ms=quiet, busy_ms=loaded,
                         slowdown=loaded / quiet))
        print(f"{op:16s} {str(shape):20s} quiet {quiet:9.3f} ms  beside a busy process "
              f"{loaded:9.3f} ms  x{loaded / quiet:.2f}", flush=True)
    if args.default:
        extra = ["--adapt-threads"] if args.adapt_threads else []
        quiet = timed_default(extra)
        hog = busy()
        try:
            loaded = timed_default(extra)
        finally:
            hog.kill()
            hog.wait()
        rows.append(dict(op="python -m dqo.train", shape=None, quiet_ms=1e3 * quiet,
                         busy_ms=1e3 * loaded, slowdown=loaded / quiet))
        print(f"python -m dqo.train: quiet {quiet:.0f} s, beside a busy process {loaded:.0f} s, "
              f"x{loaded / quiet:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu-busy-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(dict(loadavg_at_start=load, threads=torch.get_num_threads(),
                                   command="python benchmarks/busy.py " + " ".join(
                                       argv or sys.argv[1:]), rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
