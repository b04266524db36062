"""The naive eager formulation: what a user would write without this library.

One einsum for the Tucker product, ``Σ Δ^k/k!`` for the series, ``W * E``,
plain autograd (which keeps several weight-sized tensors for backward). It is
the baseline of every benchmark and, run in float64, the reference the tests
compare every backend against. It shares no code with the fast path.
"""
from __future__ import annotations

import math
import string
from typing import Optional, Sequence

import torch
from torch import Tensor


def tucker_einsum(core: Tensor, factors: Sequence[Optional[Tensor]]) -> Tensor:
    """``core ×_1 U_1 ... ×_N U_N`` as one einsum (None = identity)."""
    letters = iter(string.ascii_letters)
    core_idx = [next(letters) for _ in range(core.dim())]
    out_idx, operands, specs = [], [core], ["".join(core_idx)]
    for n, f in enumerate(factors):
        if f is None:
            out_idx.append(core_idx[n])
        else:
            o = next(letters)
            out_idx.append(o)
            operands.append(f)
            specs.append(o + core_idx[n])
    return torch.einsum(",".join(specs) + "->" + "".join(out_idx), *operands)


def series_ref(d: Tensor, order: Optional[int]) -> Tensor:
    if order is None:
        return torch.exp(d)
    return sum(d ** k / math.factorial(k) for k in range(order + 1))


def lie_weight_ref(weight: Tensor, core: Tensor, factors, order: Optional[int] = 1,
                   scale: float = 1.0) -> Tensor:
    return weight * series_ref(scale * tucker_einsum(core, factors), order)


def lie_weight_lowrank_ref(weight: Tensor, a: Tensor, b: Tensor, order: Optional[int] = 1,
                           scale: float = 1.0) -> Tensor:
    return weight * series_ref(scale * (b @ a).view(weight.shape), order)
