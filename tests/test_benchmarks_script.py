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
                          "--ops", "dqo_loss,token_logprobs", "--reps", "1", "--min-time", "0",
                          "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["op"] for r in rows} == {"dqo_loss", "token_logprobs"}
    assert {"ours", "eager", "torchrl", "trl"} <= {r["impl"] for r in rows}  # peers: rows
    for r in rows:  # a peer that is not installed here is a row with its error
        assert (r["ms"] > 0) if not r.get("failed") else (r["ms"] is None and r["failed"])
    assert all(r["floor_ms"] > 0 for r in rows)
    table = next(tmp_path.glob("*.md")).read_text()
    assert "Against the strongest peer of each op" in table


def test_a_failing_peer_is_a_row_of_the_table(tmp_path, monkeypatch):
    import importlib.util

    import torch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    build = run.build

    def eager_oom(op, impl, *a):
        if impl == "eager":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB\nmore")
        return build(op, impl, *a)

    monkeypatch.setattr(run, "build", eager_oom)
    monkeypatch.setattr(run, "plan", lambda *a: [dict(op="dqo_loss", shape=[2, 8],
                                                      impls=["ours", "eager"])])
    monkeypatch.setattr(run, "measure_rates", lambda device: dict(
        bandwidth_GBps=10.0, matmul_TFLOPs=0.1, matmul_dtype="torch.float32"))
    run.main(["--reps", "1", "--min-time", "0", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*.json")
    rows = {r["impl"]: r for r in json.loads(result.read_text())["rows"]}
    assert rows["ours"]["ms"] > 0 and rows["eager"]["ms"] is None
    assert rows["eager"]["failed"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate " \
                                      "40.00 GiB"
    table = next(tmp_path.glob("*.md")).read_text()
    assert "| dqo_loss | [2, 8] | eager | failed: OutOfMemoryError: CUDA out of memory." in table


def test_pytest_benchmark_suite_runs_each_case_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "bench_ops.py"),
                          "-q", "-p", "no:cacheprovider", "-k", "dqo_loss or token_logprobs"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_benchmark_script_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "refusing to time the Triton interpreter" in res.stderr


def test_triton_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every Triton kernel the public ops launch lowers to an sm_90 cubin with the arguments'
    real specializations, captured from the launchers (the interpreter cannot check this), and
    none but the fp64 scan comes near spilling registers to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"),
                          "--arch", "90", "--json", str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len({r["kernel"] for r in rows}) >= 3  # the scan, the log-probs forward and backward
    assert all(r["via"] == "public op" and r["regs"] > 0 for r in rows), rows
    assert all(r["local"] == 0 for r in rows if "fp64" not in r["case"]), rows
    # the launch's specializations reached the compiler: unit strides, 16-divisible pointers
    scan = next(r for r in rows if r["case"].startswith("dqo_loss [16, 2048] fp32"))
    assert "s_lp_t" in scan["ints_equal_1"] and "logp" in scan["divisible_by_16"], scan
    assert all(sum(r["memory"]["ld"].values()) > 0 for r in rows)


def test_gpu_check_tiny_runs_and_every_check_passes(tmp_path):
    """The one-call GPU script (benchmarks/gpu_check.py) at toy sizes on CPU in the Triton
    interpreter: a broken script fails here, in CI, before it costs device time."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny",
                          "--sections", "check,bench", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "check.json", "log.txt",
                                                          "summary.md"]
    check = json.loads((tmp_path / "check.json").read_text())
    rows = check["rows"]
    assert check["counts"]["failed"] == 0 and check["counts"]["passed"] >= 40
    assert not [r for r in rows if r.get("ok") is False], rows
    parts = {r["part"] for r in rows if r.get("ok")}
    assert parts == {"scan", "token_logprobs", "linear_logprobs"}, parts
    scan = [r for r in rows if r["part"] == "scan"]
    assert {r["dtype"] for r in scan} == {"float32", "bfloat16"}
    assert all(r["bitwise"] and r["finite"] for r in scan)
    assert {r["layout"] for r in scan} == {"full", "ragged", "left", "pad_rows", "interleaved",
                                           "strided"}
    env_ = check["environment"]
    assert env_["command"].startswith("python benchmarks/gpu_check.py --tiny")
    assert {"torch", "triton", "device", "cuda", "driver"} - set(env_) <= {"driver"}
    assert "passed, 0 failed" in (tmp_path / "summary.md").read_text()
    # the bench code ran once per row (toy sizes; a missing peer is a row with its error)
    bench = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["op"] for r in bench} == {"dqo_scan", "token_logprobs", "linear_logprobs"}
    ours = [r for r in bench if r["impl"] in ("ours", "scan kernel (launcher)")
            or r["impl"].startswith("fused_dqo_loss")]
    assert len(ours) == 8 and all(r["ms"] > 0 and not r.get("failed") for r in ours), ours
    assert all(r["ms"] is not None or r.get("failed") or r.get("skipped") for r in bench)
    eager = [r for r in bench if r["impl"] == "eager"]
    assert eager and all(r["vs_ours"]["logp_max_abs"] < 0.1 for r in eager), eager


def test_gpu_check_refuses_the_interpreter_without_tiny(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                          "--sections", "bench", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "unset TRITON_INTERPRET, or pass --tiny" in res.stderr
