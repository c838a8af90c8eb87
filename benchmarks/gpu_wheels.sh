#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.py needs on a lent GPU machine and that its
# image lacks: the peers Liger-Kernel and Cut Cross-Entropy (pure Python; their needs, torch and
# triton, are on the image, which has torch 2.11, Triton 3.6, transformers, peft, accelerate and
# pytest-xdist, and no network). They go to .whl/ (git-ignored), for the device's Python 3.12:
#
#   bash benchmarks/gpu_wheels.sh
#
# then one device call (see benchmarks/README.md, "GPU"):
#
#   run(command="python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site
#                .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3
#                benchmarks/gpu_check.py --out $OUT", carry=[".whl"], timeout_s=540)
#   give_back()
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Pinned: the versions whose APIs gpu_check.py calls (LigerCrossEntropyLoss,
# LigerFusedLinearCrossEntropyLoss(reduction="none"), cut_cross_entropy.linear_cross_entropy).
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
