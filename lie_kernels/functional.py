"""Public functional API: ``W' = W ⊙ exp_K(scale · Δ)`` for the two parametrizations."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import ops
from .validation import check_factor, check_order, check_scale, check_weight
from .tucker import tucker_to_gemm


def lie_weight(weight: Tensor, core: Tensor, factors: Sequence[Optional[Tensor]], *,
               order: Optional[int] = 1, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """Tucker (mode-wise) LieRA update of a weight.

    ``W' = W ⊙ exp_K(scale · Δ)``, ``Δ = core ×_1 U_1 ×_2 U_2 ... ×_N U_N``,
    where ``factors[n]`` is ``U_n`` of shape ``(weight.shape[n], core.shape[n])``
    or None (identity: then ``core.shape[n] == weight.shape[n]``). ``order`` is
    the series truncation K >= 0 (None: exact exp). Returns a new tensor in W's
    dtype, differentiable in core, factors and W. Δ is never materialised: the
    backends fuse ``Δ_(1) = U_1 @ P`` with the Lie map (see ``tucker``).
    """
    check_weight(weight)
    order, scale = check_order(order), check_scale(scale, dtype=weight.dtype)
    u, p = tucker_to_gemm(weight, core, factors)
    return ops.apply(weight, u, p, order, scale, backend)


def lie_weight_lowrank(weight: Tensor, a: Tensor, b: Tensor, *, order: Optional[int] = 1,
                       scale: float = 1.0, backend: str = "auto") -> Tensor:
    """Low-rank LieRA update: ``W' = W ⊙ exp_K(scale · (b @ a).view(W.shape))``.

    ``b`` is ``(C_out, r)`` and ``a`` is ``(r, prod(W.shape[1:]))`` (LoRA's B and
    A on the ``(C_out, rest)`` unfolding). Order 1 is HiRA's ``W + W ⊙ s·(B@A)``.
    ``a`` and ``b`` have W's dtype, or fp32 for a fp16/bf16 W (PEFT's default
    ``autocast_adapter_dtype=True``); the result has W's dtype.
    """
    check_weight(weight)
    order, scale = check_order(order), check_scale(scale, dtype=weight.dtype)
    check_factor("b", b, weight, ndim=2, fp32_ok=True)
    rows, cols = weight.shape[0], weight.shape[1:].numel()
    if b.shape[0] != rows:
        raise ValueError(f"b must have shape ({rows}, r) (weight.shape[0], rank), "
                         f"got {tuple(b.shape)}")
    check_factor("a", a, weight, shape=(b.shape[1], cols), fp32_ok=True)
    return ops.apply(weight, b, a, order, scale, backend)
