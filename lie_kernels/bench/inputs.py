"""Random benchmark inputs for a weight shape and a parametrization."""
from __future__ import annotations

from typing import List, Tuple

import torch

from .shapes import Case


def make(case: Case, parametrization: str, dtype: torch.dtype, device: str,
         seed: int = 0) -> Tuple[torch.Tensor, list]:
    """``(W, factor args)``: ``[core, factors]`` (Tucker) or ``[a, b]`` (low-rank).

    Factors are scaled so that ``|Δ| ~ 0.1``, the size of a real update, and
    require grad; W is frozen.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0):
        t = torch.randn(*shape, generator=g) * std
        return t.to(device=device, dtype=dtype).requires_grad_()

    w = torch.randn(*case.shape, generator=g).to(device=device, dtype=dtype)
    if parametrization == "lowrank":
        cols = w[0].numel()
        return w, [rnd(case.rank, cols, std=cols ** -0.5), rnd(case.shape[0], case.rank,
                                                              std=0.1 * case.rank ** -0.5)]
    factors: List = [None if r == d and n > 0 else rnd(d, r, std=d ** -0.5)
                     for n, (d, r) in enumerate(zip(case.shape, case.ranks))]
    return w, [rnd(*case.ranks, std=0.1), factors]


def leaves(args: list) -> List[torch.Tensor]:
    """The trainable tensors among the factor args."""
    out = []
    for a in args:
        out += [t for t in (a if isinstance(a, list) else [a]) if t is not None]
    return out
