"""Build the adapted weights of many layers in one call.

A model has dozens of adapted convs; on a GPU the small ones are launch-bound,
so ``lie_gemm_many`` hands all of them to the backend at once (the Triton
backend runs one grouped launch over a table of pointers and sizes). One
autograd node covers every layer and, like the single-layer op, saves only the
weights and factors.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..backends import get_backend, select_backend


class _ManyLieGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, order, backend, scales, *flat):
        ws, us, ps = flat[0::3], flat[1::3], flat[2::3]
        ctx.save_for_backward(*flat)
        ctx.order, ctx.backend, ctx.scales = order, backend, scales
        return tuple(get_backend(backend).forward_many(ws, us, ps, order, scales))

    @staticmethod
    def backward(ctx, *grads):
        flat = ctx.saved_tensors
        be = get_backend(ctx.backend)
        res = [None, None, None]
        for i, g in enumerate(grads):
            w, u, p = flat[3 * i: 3 * i + 3]
            if g is None:
                res += [None, None, None]
                continue
            dw, du, dp = be.backward(g, w, u, p, ctx.order, ctx.scales[i],
                                     ctx.needs_input_grad[3 + 3 * i])
            res += [dw, du, dp]
        return tuple(res)


def lie_gemm_many(weights: Sequence[Tensor], us: Sequence[Tensor], ps: Sequence[Tensor],
                  scales: Sequence[float], order: Optional[int], backend: str = "auto"
                  ) -> List[Tensor]:
    """``[W_i ⊙ exp_K(scale_i · u_i @ p_i)]`` for already-checked inputs, one call.

    All inputs share one device and ``order``; ``backend="auto"`` is resolved on
    the first layer and must take every layer (else the torch backend is used).
    """
    be = select_backend(backend, weights[0], us[0], ps[0], order)
    if any(be.not_supported_reasons(w, u, p, order) for w, u, p in zip(weights, us, ps)):
        if backend != "auto":
            raise RuntimeError(f"backend {backend!r} cannot take every layer of the group")
        be = get_backend("torch")
    flat = [t for triple in zip(weights, us, ps) for t in triple]
    return list(_ManyLieGemm.apply(order, be.name, tuple(float(s) for s in scales), *flat))
