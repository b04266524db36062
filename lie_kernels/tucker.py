"""Mode (Tucker) products and the reduction of a Tucker update to one GEMM.

``Δ = G ×_1 U_1 ×_2 U_2 ... ×_N U_N`` with core ``G`` of shape ``(r_1..r_N)``
and factors ``U_n`` of shape ``(d_n, r_n)``. Unfolding along mode 1 gives
``Δ_(1) = U_1 @ P`` with ``P = (G ×_2 U_2 ... ×_N U_N)_(1)`` of shape
``(r_1, d_2···d_N)``: tiny to build, and the only weight-sized work left is
that small-inner-dimension GEMM, which the backends fuse with the Lie map.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .validation import check_factor
from .series import compute_dtype


def mode_product(x: Tensor, u: Tensor, mode: int) -> Tensor:
    """``x ×_mode u``: ``y[.., j, ..] = Σ_i x[.., i, ..] · u[j, i]``, u of shape
    ``(J, x.shape[mode])``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"mode_product: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if isinstance(mode, bool) or not isinstance(mode, int) or not -x.dim() <= mode < x.dim():
        raise ValueError(f"mode_product: mode must be an int in [{-x.dim()}, {x.dim()}) "
                         f"for x of shape {tuple(x.shape)}, got {mode!r}")
    mode %= x.dim()
    check_factor("u", u, x, ndim=2)
    if u.shape[1] != x.shape[mode]:
        raise ValueError(f"mode_product: u must have shape (J, {x.shape[mode]}) to act on "
                         f"mode {mode} of x {tuple(x.shape)}, got {tuple(u.shape)}")
    return torch.movedim(torch.tensordot(x, u, dims=([mode], [1])), -1, mode)


def _check_tucker(core: Tensor, factors: Sequence[Optional[Tensor]],
                  shape: Optional[Sequence[int]] = None) -> None:
    if not isinstance(core, Tensor) or not core.is_floating_point():
        raise TypeError(f"core must be a floating-point tensor, got "
                        f"{core.dtype if isinstance(core, Tensor) else type(core).__name__}")
    if core.numel() == 0:
        raise ValueError(f"core must have every rank >= 1, got shape {tuple(core.shape)}")
    if not isinstance(factors, (list, tuple)) or len(factors) != core.dim():
        got = len(factors) if isinstance(factors, (list, tuple)) else type(factors).__name__
        raise ValueError(f"factors must be a list with one entry (tensor or None) per core "
                         f"mode: expected {core.dim()}, got {got}")
    for n, f in enumerate(factors):
        d = shape[n] if shape is not None else None
        if f is None:
            if d is not None and core.shape[n] != d:
                raise ValueError(f"factors[{n}] is None (identity), so core.shape[{n}] must "
                                 f"equal weight.shape[{n}]={d}, got {core.shape[n]}")
            continue
        check_factor(f"factors[{n}]", f, core, ndim=2)
        if f.shape[1] != core.shape[n] or (d is not None and f.shape[0] != d):
            want = f"({d if d is not None else 'd'}, {core.shape[n]})"
            raise ValueError(f"factors[{n}] must have shape {want} (weight dim, core rank), "
                             f"got {tuple(f.shape)}")


def _apply(core: Tensor, factors: Sequence[Optional[Tensor]]) -> Tensor:
    # Apply the factors that grow the tensor least first: the cheapest order.
    todo = [(f.shape[0] / f.shape[1], n, f) for n, f in enumerate(factors) if f is not None]
    y = core
    for _, n, f in sorted(todo, key=lambda t: t[0]):
        y = torch.movedim(torch.tensordot(y, f, dims=([n], [1])), -1, n)
    return y


def tucker(core: Tensor, factors: Sequence[Optional[Tensor]]) -> Tensor:
    """``G ×_1 U_1 ... ×_N U_N``; a ``None`` factor is the identity on its mode."""
    _check_tucker(core, factors)
    return _apply(core, factors)


def tucker_to_gemm(weight: Tensor, core: Tensor, factors: Sequence[Optional[Tensor]]
                   ) -> Tuple[Tensor, Tensor]:
    """``(u, p)`` with ``Δ_(1) = u @ p``, after checking core and factors against W.

    For a 16-bit W, ``p`` is built (and differentiated) in fp32: a mode product of
    16-bit factors can overflow (core 300 × U_2 300 = 9e4 > fp16's 65504) even when
    Δ = U_1 @ P itself is small. ``u`` keeps W's dtype; backends take an fp32 ``p``.
    """
    check_factor("core", core, weight, fp32_ok=True)  # fp32 factors: 16-bit W only
    if core.dim() != weight.dim():
        raise ValueError(f"core must have one mode per weight dim: expected {weight.dim()} "
                         f"dims, got core shape {tuple(core.shape)}")
    _check_tucker(core, factors, weight.shape)
    cd = compute_dtype(weight.dtype)
    p = _apply(core.to(cd), [None, *(None if f is None else f.to(cd) for f in factors[1:])])
    p = p.reshape(core.shape[0], -1)
    u = factors[0]
    if u is None:
        u = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return u, p
