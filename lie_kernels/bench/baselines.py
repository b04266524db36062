"""What users would run without this library: every benchmark compares against these.

* ``eager``, shown as ``eager reference``: the naive formulation of
  ``lie_kernels.reference`` (einsum Tucker product or ``b @ a``, ``Σ Δ^k/k!``,
  ``W * E``, plain autograd);
* ``compile``, shown as ``torch.compile(reference)``: ``torch.compile`` (inductor)
  of that same function, on CUDA and on CPU;
* ``hira``, shown as ``PEFT HiRA formula``: PEFT HiRA's first-order low-rank
  formula ``W + W ⊙ (s·B@A)`` in plain PyTorch.

This library's backends are shown as ``lie_kernels[<backend>]``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..reference import lie_weight_lowrank_ref, lie_weight_ref

#: the name each method has in tables, CSVs and plots
LABELS = {"eager": "eager reference", "compile": "torch.compile(reference)",
          "hira": "PEFT HiRA formula"}


def label(method: str) -> str:
    """Display name of a baseline key or of a backend name."""
    return LABELS.get(method, f"lie_kernels[{method}]")


def hira(weight, a, b, scale: float):
    """PEFT HiRA's update (order 1, low-rank only)."""
    return weight + weight * (scale * (b @ a)).view(weight.shape)


_COMPILED: Dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """``torch.compile`` of a reference function, built once per process.

    Every shape and order is its own graph (``dynamic=False``, as a user
    compiling one model gets). Dynamo's default of 8 graphs per function would
    silently fall back to eager beyond the 8th, so the limit is raised here.
    """
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 4096)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    if name not in _COMPILED:
        fn = {"tucker": lie_weight_ref, "lowrank": lie_weight_lowrank_ref}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def baseline_fns(parametrization: str, order: Optional[int], with_compile: bool):
    """``{key: f(weight, x, y, order, scale)}`` for the baselines that apply."""
    ref = lie_weight_ref if parametrization == "tucker" else lie_weight_lowrank_ref
    fns = {"eager": ref}
    if with_compile:
        fns["compile"] = compiled(parametrization)
    if parametrization == "lowrank" and order == 1:
        fns["hira"] = lambda w, a, b, order, scale: hira(w, a, b, scale)
    return fns
