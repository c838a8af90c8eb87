#!/usr/bin/env bash
# The GPU checklist of issue 6 in one script, for a session that is lent a GPU machine (whose
# image has torch, triton, pytest and pytest-benchmark but no network). Each step fits one
# 10-minute device call; logs and results go to $OUT (or ./gpu-out), the table is printed last.
#
#   bash benchmarks/gpu_session.sh check    # versions, then the kernel tests on CUDA tensors
#   bash benchmarks/gpu_session.sh bench    # benchmarks/run.py, every op (split with OPS=...)
#   bash benchmarks/gpu_session.sh compile  # resource report of the compiled kernels
#
# Peers: Liger-Kernel and Cut Cross-Entropy are pure-Python wheels. Fetch them here with
#   pip download --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
# and name .whl in the call's carry; this script installs whatever .whl/ holds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
  "$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "flash_attn"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "installed"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
EOF
}

case "${1:-check}" in
  check)
    versions
    # The kernel tests: CUDA tensors and compiled Triton (tests/conftest.py sets no
    # interpreter when CUDA is there). The trainer tests need deepspeed/math-verify, absent
    # on the image.
    "$PY" -m pytest -x -q -p no:cacheprovider tests/kernels/test_dqo_loss.py \
      tests/kernels/test_logprobs.py tests/kernels/test_validation.py \
      tests/kernels/test_properties.py 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
    ;;
  bench)
    versions
    "$PY" benchmarks/run.py --ops "${OPS:-dqo_loss,token_logprobs,linear_logprobs,loss_head}" \
      --out "$OUT" 2>&1 | tee "$OUT/bench-log.txt" | tail -40
    ;;
  compile)
    "$PY" benchmarks/compile_report.py --arch 90 --json "$OUT/compile.json" 2>&1 \
      | tee "$OUT/compile.txt" | tail -30
    ;;
  *)
    echo "usage: $0 check|bench|compile" >&2
    exit 2
    ;;
esac
