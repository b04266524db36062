#!/usr/bin/env bash
# One-shot GPU check for a machine with one NVIDIA GPU (e.g. the H200 device tool):
# build the CUDA extension, run the test suite on the GPU (every backend on CUDA tensors,
# bf16 included), run the sweep with bandwidth fractions and the roofline prediction beside
# each Triton measurement (pred_ms, pred_frac), the fused Linear backward against the unfused
# one (time, peak memory), then a few rows again under
# torch.use_deterministic_algorithms(True) (the split-partial backward), and write everything
# under $OUT (default bench/results/<date>-<gpu>/). Budget: under 10 minutes in all (the device
# tool allows 10 a call, 15 a session). No network needed.
# The static kernel gate (tests/test_kernel_health.py) needs no GPU and runs in CI: skipped here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
OUT=${OUT:-bench/results/$(date -u +%Y-%m-%d)-${GPU:-gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo "$(date -u +%H:%M:%S) $*" >> "$OUT/versions.txt"; }
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/versions.txt" 2>&1
if command -v nvcc > /dev/null; then
  LIE_KERNELS_BUILD_DIR=$PWD/build/cuda timeout 150 $PY -m lie_kernels.cuda_build \
    > "$OUT/build.log" 2>&1; step "cuda build rc=$?"
fi
export LIE_KERNELS_BUILD_DIR=$PWD/build/cuda  # the extension built above
timeout 200 $PY -m pytest tests -q -p no:cacheprovider --ignore=tests/test_kernel_health.py \
  -rs > "$OUT/tests.log" 2>&1; step "tests rc=$?"
$PY -m lie_kernels.bench roofline --out "$OUT" > /dev/null 2>&1; step "roofline rc=$?"
# bf16 only: every point compiles the reference with torch.compile (about 1 s each)
timeout 110 $PY -m lie_kernels.bench --shapes all --orders 1,4,exact --dtypes bf16 \
  --no-memory --out "$OUT" > /dev/null 2>&1; step "sweep rc=$?"
timeout 30 $PY -m lie_kernels.bench multi --out "$OUT" > /dev/null 2>&1; step "multi rc=$?"
# the fused Linear backward (dL/dW' never written) against forming dL/dW' first
timeout 30 $PY -m lie_kernels.bench linear --out "$OUT" > /dev/null 2>&1; step "linear rc=$?"
# the deterministic backward (split partials, fixed order) beside the default atomic one
mkdir -p "$OUT/deterministic"
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 40 $PY -c "import sys, torch
torch.use_deterministic_algorithms(True)
from lie_kernels.bench.__main__ import main
main(sys.argv[1:])" --shapes linear.4096x4096,linear.11008x4096,sd15.3x3.1280 --orders 1 \
  --dtypes bf16 --params lowrank --passes fwdbwd --no-memory --out "$OUT/deterministic" \
  > /dev/null 2>&1; step "deterministic sweep rc=$?"
ls -la "$OUT"
