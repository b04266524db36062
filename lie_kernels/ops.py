"""The fused op as a ``torch.library`` custom op with a registered autograd formula.

``lie_kernels::lie_gemm(weight, u, p, order, scale, backend)`` computes
``W ⊙ exp_K(scale · u @ p)`` on W's ``(C_out, M)`` unfolding (``order=-1``
encodes the exact exp; ``backend`` is a backend name or ``"auto"``). Being a
custom op with fake implementations, it is opaque to ``torch.compile`` (no graph
breaks) and autograd saves only W, u and p: never a tensor the size of W, but for
the one size rule below.
Under ``torch.compile`` the backend is resolved inside the op, at run time:
the registry (lazy imports, availability probes) is not traceable by dynamo.

Eager mode runs the same formula through ``_EagerLieGemm``, with one size rule a
backend may opt into (``Backend.keeps_output``; the torch backend does for the
exact exp on a small frozen fp32/fp64 W): the op saves W' itself, so changing
that W' in place before backward raises autograd's in-place error there.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import Backend, select_backend

EXACT = -1  # the op schema has no Optional[int]; -1 stands for order=None


def _order(order: int) -> Optional[int]:
    return None if order == EXACT else order


def _backend(name: str, weight: Tensor, u: Tensor, p: Tensor, order: int) -> Backend:
    # Same inputs, same choice: forward and backward resolve "auto" identically.
    return select_backend(name, weight, u, p, _order(order))


@torch.library.custom_op("lie_kernels::lie_gemm", mutates_args=())
def lie_gemm(weight: Tensor, u: Tensor, p: Tensor, order: int, scale: float,
             backend: str) -> Tensor:
    return _backend(backend, weight, u, p, order).forward(weight, u, p, _order(order), scale)


@lie_gemm.register_fake
def _(weight, u, p, order, scale, backend):
    return weight.new_empty(weight.shape)


def without_autocast(device: torch.device):
    """Autocast off around a backward's math: an autocast region around ``backward()``
    would run the backends' out-of-place GEMMs in 16 bits and cut fp32 factor gradients
    to ~3e-3 relative error. A no-op context when autocast is off (the usual case)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("lie_kernels::lie_gemm_backward", mutates_args=())
def lie_gemm_backward(grad: Tensor, weight: Tensor, u: Tensor, p: Tensor, order: int,
                      scale: float, backend: str, need_dw: bool
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    with without_autocast(grad.device):
        dw, du, dp = _backend(backend, weight, u, p, order).backward(
            grad, weight, u, p, _order(order), scale, need_dw)
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


DOUBLE_BACKWARD = ("lie_kernels: the fused op has a first-order backward only; double "
                   "backward (create_graph=True, higher-order grads) is not supported. For "
                   "second derivatives use lie_kernels.reference.lie_weight_ref (plain autograd)")
FORWARD_AD = ("lie_kernels: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is "
              "not supported by the fused op; use lie_kernels.reference.lie_weight_ref")


def _no_double_backward(*_):
    raise NotImplementedError(DOUBLE_BACKWARD)


def _backward(ctx, grad):
    if torch.is_grad_enabled():  # backward itself is being recorded: create_graph=True
        raise NotImplementedError(DOUBLE_BACKWARD)
    weight, u, p = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[0]
    dw, du, dp = lie_gemm_backward(grad, weight, u, p, ctx.order, ctx.scale, ctx.backend,
                                   need_dw)
    return (dw if need_dw else None, du, dp, None, None, None)


lie_gemm.register_autograd(_backward, setup_context=_setup_context)
lie_gemm_backward.register_autograd(_no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


class _EagerLieGemm(torch.autograd.Function):
    """The same op and formula without the custom-op dispatcher (~0.2 ms less per step).

    Eager mode takes this path with an already resolved backend; ``torch.compile``
    sees the custom op above.
    """

    @staticmethod
    def forward(ctx, weight, u, p, order, scale, backend: Backend):
        out = backend.forward(weight, u, p, _order(order), scale)
        # a small weight's W' may be cheaper to keep than to rebuild (Backend.keeps_output)
        ctx.keep = not ctx.needs_input_grad[0] and backend.keeps_output(weight, _order(order))
        # ctx-style forward: a separate setup_context costs a signature bind per call
        _setup_context(ctx, (out if ctx.keep else weight, u, p, order, scale, backend), None)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise NotImplementedError(DOUBLE_BACKWARD)
        saved, u, p = ctx.saved_tensors
        with without_autocast(grad.device):
            if ctx.keep:
                du, dp = ctx.backend.output_backward(grad, saved, u, p, ctx.scale)
                return None, du, dp, None, None, None
            need_dw = ctx.needs_input_grad[0]
            dw, du, dp = ctx.backend.backward(grad, saved, u, p, _order(ctx.order),
                                              ctx.scale, need_dw)
        return dw, du, dp, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(FORWARD_AD)


def apply(weight: Tensor, u: Tensor, p: Tensor, order: Optional[int], scale: float,
          backend: str) -> Tensor:
    """Run the fused op: the custom op under ``torch.compile``, the lean Function in eager."""
    code = EXACT if order is None else order
    if torch.compiler.is_compiling():
        return lie_gemm(weight, u, p, code, scale, backend)
    return _EagerLieGemm.apply(weight, u, p, code, scale,
                               select_backend(backend, weight, u, p, order))
