"""pytest-benchmark suite: ``pytest bench/ --benchmark-only``.

Small on a CPU (a few representative shapes); on a GPU the same file runs
every backend. The full sweep with tables, CSV and plot is the CLI:
``python -m lie_kernels.bench``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")  # never benchmark the interpreter
