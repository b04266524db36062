"""What users would run without this library: every benchmark compares against these.

* ``eager``: the naive formulation of ``lie_kernels.reference`` (einsum Tucker
  product or ``b @ a``, ``Σ Δ^k/k!``, ``W * E``, plain autograd);
* ``compile``: ``torch.compile`` of that same function;
* ``hira``: PEFT HiRA's first-order low-rank formula ``W + W ⊙ (s·B@A)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..reference import lie_weight_lowrank_ref, lie_weight_ref


def hira(weight, a, b, scale: float):
    """PEFT HiRA's update (order 1, low-rank only)."""
    return weight + weight * (scale * (b @ a)).view(weight.shape)


_COMPILED: Dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """``torch.compile`` of a reference function, built once per process."""
    if name not in _COMPILED:
        fn = {"tucker": lie_weight_ref, "lowrank": lie_weight_lowrank_ref}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def baseline_fns(parametrization: str, order: Optional[int], with_compile: bool):
    """``{label: f(weight, x, y, order, scale)}`` for the baselines that apply."""
    ref = lie_weight_ref if parametrization == "tucker" else lie_weight_lowrank_ref
    fns = {"eager": ref}
    if with_compile:
        fns["compile"] = compiled(parametrization)
    if parametrization == "lowrank" and order == 1:
        fns["hira"] = lambda w, a, b, order, scale: hira(w, a, b, scale)
    return fns
