"""benchmarks/run.py keeps working (it is run, never timed, here: no assertion on speed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_script_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                          "--ops", "dqo_loss,token_logprobs", "--reps", "1", "--out",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["op"] for r in rows} == {"dqo_loss", "token_logprobs"}
    assert {"ours", "eager"} <= {r["impl"] for r in rows}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)


def test_benchmark_script_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "refusing to time the Triton interpreter" in res.stderr


def test_triton_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every Triton kernel variant lowers to an sm_90 cubin (the interpreter cannot check
    this), and none but the fp64 scan comes near spilling registers to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"),
                          "--arch", "90", "--json", str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"dqo_scan_fwd", "logprobs_fwd", "logprobs_bwd"}
    assert all(r["local"] == 0 for r in rows if r["dtype"] != "fp64"), rows
