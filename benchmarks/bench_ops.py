"""The steps of ``benchmarks/run.py`` as a pytest-benchmark suite, for comparing runs over time
(``--benchmark-autosave`` / ``--benchmark-compare``) in the tool the field uses::

    python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-only
    python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-autosave

Shapes are run.py's ``--quick`` plan for this device; each case is one forward + backward of
one implementation, grouped with its peers. This is a measurement, never a test: it asserts
nothing about time, and ``python -m pytest tests`` does not collect it.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("dqo_benchmarks_run",
                                               Path(__file__).with_name("run.py"))
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)  # refuses the Triton interpreter, as run.py does

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [pytest.param(job["op"], job["shape"], impl, id=f"{job['op']}-{job['shape']}-{impl}",
                      marks=[] if run.peer_installed(impl) else pytest.mark.skip(
                          reason=f"{impl} is not installed"))
         for job in run.plan(DEVICE, quick=True, ops=run.OPS) for impl in job["impls"]]


@pytest.mark.parametrize("op,shape,impl", CASES)
def test_fwd_bwd(benchmark, op, shape, impl):
    step = run.build(op, impl, shape, DEVICE, DTYPE)

    def synced():
        step()
        run.sync(DEVICE)

    benchmark.group = f"{op} {shape}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE))
    benchmark.pedantic(synced, warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 30)
