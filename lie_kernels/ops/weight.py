"""The fused op as a ``torch.library`` custom op with a registered autograd formula.

``lie_kernels::lie_gemm(weight, u, p, order, scale, backend)`` computes
``W ⊙ exp_K(scale · u @ p)`` on W's ``(C_out, M)`` unfolding (``order`` is
``lie_kernels.order.encode_order(order)``: -1 is the exact exp; ``backend`` is a backend
name or ``"auto"``). Being a custom op with fake implementations, it is opaque to
``torch.compile`` (no graph breaks) and autograd saves only W, u and p: never a tensor the
size of W, but for the one size rule below.
Under ``torch.compile`` the backend is resolved inside the op, at run time:
the registry (lazy imports, availability probes) is not traceable by dynamo.

Eager mode runs the same formula through ``EagerLieGemm``, with one size rule a
backend may opt into (``Backend.keeps_output``; the torch backend does for the
exact exp on a small frozen fp32/fp64 W): the op saves W' itself, so changing
that W' in place before backward raises autograd's in-place error there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend, select_backend
from ..order import decode_order, encode_order
from ..quant import QuantizedWeight
from .common import (FORWARD_AD, check_no_double_backward, no_double_backward,
                     resolve_backend, without_autocast)


@torch.library.custom_op("lie_kernels::lie_gemm", mutates_args=())
def lie_gemm(weight: Tensor, u: Tensor, p: Tensor, order: int, scale: float,
             backend: str) -> Tensor:
    return resolve_backend(backend, weight, u, p, order).forward(
        weight, u, p, decode_order(order), scale)


@lie_gemm.register_fake
def _(weight, u, p, order, scale, backend):
    return weight.new_empty(weight.shape)


@torch.library.custom_op("lie_kernels::lie_gemm_backward", mutates_args=())
def lie_gemm_backward(grad: Tensor, weight: Tensor, u: Tensor, p: Tensor, order: int,
                      scale: float, backend: str, need_dw: bool
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    with without_autocast(grad.device):
        dw, du, dp = resolve_backend(backend, weight, u, p, order).backward(
            grad, weight, u, p, decode_order(order), scale, need_dw)
    # The schema cannot return None: an empty tensor stands for "dW not asked for".
    return (weight.new_empty(0) if dw is None else dw), du, dp


@lie_gemm_backward.register_fake
def _(grad, weight, u, p, order, scale, backend, need_dw):
    dw = weight.new_empty(weight.shape if need_dw else (0,))
    return dw, u.new_empty(u.shape), p.new_empty(p.shape)


def _setup_context(ctx, inputs, output):
    weight, u, p, order, scale, backend = inputs
    ctx.save_for_backward(weight, u, p)
    ctx.order, ctx.scale, ctx.backend = order, scale, backend


def _backward(ctx, grad):
    check_no_double_backward()
    weight, u, p = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[0]
    dw, du, dp = lie_gemm_backward(grad, weight, u, p, ctx.order, ctx.scale, ctx.backend,
                                   need_dw)
    return (dw if need_dw else None, du, dp, None, None, None)


lie_gemm.register_autograd(_backward, setup_context=_setup_context)
lie_gemm_backward.register_autograd(no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


class EagerLieGemm(torch.autograd.Function):
    """The same op and formula without the custom-op dispatcher (~0.2 ms less per step).

    Eager mode takes this path with an already resolved backend; ``torch.compile``
    sees the custom op above.
    """

    @staticmethod
    def forward(ctx, weight, u, p, order, scale, backend: Backend):
        out = backend.forward(weight, u, p, decode_order(order), scale)
        # a small weight's W' may be cheaper to keep than to rebuild (Backend.keeps_output)
        ctx.keep = (not ctx.needs_input_grad[0]
                    and backend.keeps_output(weight, decode_order(order)))
        # a quantized W is frozen and no tensor: it rides on ctx (save_for_backward None)
        ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None
        saved = out if ctx.keep else (None if ctx.quantized else weight)
        # ctx-style forward: a separate setup_context costs a signature bind per call
        _setup_context(ctx, (saved, u, p, order, scale, backend), None)
        return out

    @staticmethod
    def backward(ctx, grad):
        check_no_double_backward()
        saved, u, p = ctx.saved_tensors
        if ctx.quantized is not None and not ctx.keep:
            saved = ctx.quantized
        with without_autocast(grad.device):
            if ctx.keep:
                du, dp = ctx.backend.output_backward(grad, saved, u, p, ctx.scale)
                return None, du, dp, None, None, None
            need_dw = ctx.needs_input_grad[0]
            dw, du, dp = ctx.backend.backward(grad, saved, u, p, decode_order(ctx.order),
                                              ctx.scale, need_dw)
        return dw, du, dp, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(FORWARD_AD)


def apply(weight: Tensor, u: Tensor, p: Tensor, order: Optional[int], scale: float,
          backend: str) -> Tensor:
    """Run the fused op: the custom op under ``torch.compile``, the lean Function in eager
    (a quantized W, which the custom op's schema cannot take, always runs eager)."""
    code = encode_order(order)
    if isinstance(weight, QuantizedWeight):
        return _apply_quantized(weight, u, p, code, scale, backend)
    if torch.compiler.is_compiling():
        return lie_gemm(weight, u, p, code, scale, backend)
    return EagerLieGemm.apply(weight, u, p, code, scale,
                               select_backend(backend, weight, u, p, order))


@torch.compiler.disable
def _apply_quantized(weight: QuantizedWeight, u: Tensor, p: Tensor, code: int, scale: float,
                     backend: str) -> Tensor:
    """The eager op for a quantized W, also inside a compiled region (a graph break)."""
    return EagerLieGemm.apply(weight, u, p, code, scale,
                              select_backend(backend, weight, u, p, decode_order(code)))
