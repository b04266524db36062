#!/usr/bin/env bash
# One-shot GPU check for a machine with one NVIDIA GPU (e.g. the H200 device tool):
# build the CUDA extension if present, run the whole test suite on the GPU, run every
# benchmark, and write all logs, tables, CSVs and plots under $OUT (default
# bench/results/<date>-<gpu>/). Budget: about 9 minutes. No network needed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
OUT=${OUT:-bench/results/$(date -u +%Y-%m-%d)-${GPU:-gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/versions.txt" 2>&1
if command -v nvcc > /dev/null; then
  LIE_KERNELS_BUILD_DIR=$PWD/build/cuda timeout 300 $PY -m lie_kernels._cuda_build \
    > "$OUT/build.log" 2>&1 || echo "CUDA extension build failed (see build.log)" >> "$OUT/versions.txt"
fi
export LIE_KERNELS_BUILD_DIR=$PWD/build/cuda  # the extension built above
timeout 300 $PY -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/versions.txt"
timeout 150 $PY -m lie_kernels.bench --shapes all --orders 1,2,4,exact --dtypes fp32,bf16 \
  --out "$OUT" > /dev/null 2>&1
timeout 45 $PY -m lie_kernels.bench train --out "$OUT" > /dev/null 2>&1
timeout 45 $PY -m lie_kernels.bench multi --out "$OUT" > /dev/null 2>&1
ls -la "$OUT"
