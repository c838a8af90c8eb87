"""The steps of ``benchmarks/run.py`` (the modules of ``cases/``) as a pytest-benchmark suite,
for comparing runs over time (``--benchmark-autosave`` / ``--benchmark-compare``) in the tool
the field uses::

    python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-only
    python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-autosave

Shapes are run.py's ``--quick`` plan for this device; each case is one forward + backward of
one implementation, grouped with its peers. This is a measurement, never a test: it asserts
nothing about time, and ``python -m pytest tests`` does not collect it.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dqo_kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness and the cases
import harness  # noqa: E402  (refuses the Triton interpreter, as run.py does)
from cases import OPS, build, plan  # noqa: E402
from peers import peer_installed  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [pytest.param(job["op"], job["shape"], impl, id=f"{job['op']}-{job['shape']}-{impl}",
                      marks=[] if peer_installed(impl) else pytest.mark.skip(
                          reason=f"{impl} is not installed"))
         for job in plan(DEVICE, quick=True, ops=OPS) for impl in job["impls"]]


@pytest.mark.parametrize("op,shape,impl", CASES)
def test_fwd_bwd(benchmark, op, shape, impl):
    step = build(op, impl, shape, DEVICE, DTYPE)

    def synced():
        step()
        harness.sync(DEVICE)

    benchmark.group = f"{op} {shape}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE))
    benchmark.pedantic(synced, warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 30)
