"""A whole Lie layer as one autograd node: ``y = conv/linear(x, W')``, ``W' = W ⊙ exp_K(s·u@p)``.

Chaining the weight op (``ops/weight.py``) with ``F.conv2d``/``F.linear`` makes the
conv/linear node save W' for its input gradient: one W-sized tensor per adapted
layer stays alive from forward to backward. Here the layer is one node that
saves what the frozen base layer needs (x) plus W and the factors::

    forward:  W' = backend.forward(W, u, p)      y = conv(x, W') + bias      (W' freed)
    backward: W' = backend.forward(W, u, p)      dx = conv_input_grad(g_y, W') (W' freed)
              G  = dL/dW' = conv_weight_grad(g_y, x)   (Linear: g_yᵀ x)
              du, dp, dW = backend.backward(G, W, u, p)                     (G freed)

so at most one W-sized temporary is alive at a time. A Linear layer's backward is one
backend call, ``backend.linear_layer_backward``, which may reorder those steps (the torch
backend forms G first and overwrites it, block by block, with W' once the Lie backward
has read it: W is read, or dequantized, once in backward instead of twice). W' is built with
``backend.forward_transient``: used at once and dropped, it may live in a buffer
the backend reuses (the torch backend does on CPU). The last two lines are one
call, ``backend.linear_backward(g_y, x, ...)`` / ``backend.conv_backward``: the
seam where a backend may fuse ``g_yᵀ x`` with the Lie backward so G is never
written (the Triton backend does for a 16-bit Linear W: ``lie_linear_bwd_kernel``,
the GEMM with the Lie backward as its epilogue) or form G where it likes (the
torch backend: on CPU in the buffer W' used, dead by then); the default forms G.

A backend may ask (``conv_slice_rows``) for a conv layer to run a slice of output
channels at a time: W' is then built, convolved and dropped one row slice at a time in
forward and for dx, so only a slice of it is ever alive (the torch backend does on CPU for
a large W on small feature maps, where a slice costs the conv little).

Recomputing W' costs one more fused forward per layer; for layers below
``FUSE_MIN_NUMEL`` weight elements that is not worth the few KiB it saves, and
``lie_layer`` chains the weight op with the plain conv/linear instead.

As in ``ops/weight.py``: ``torch.compile`` sees ``lie_kernels::lie_linear`` /
``lie_kernels::lie_conv`` (custom ops with fakes and an autograd formula, no
graph breaks); eager mode runs the same math through a lean autograd.Function.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..backends import Backend, select_backend
from ..backends.base import row_slice, row_slices
from ..order import decode_order, encode_order
from ..quant import QuantizedWeight
from . import weight as weight_op
from .common import (FORWARD_AD, check_no_double_backward, no_double_backward,
                     resolve_backend, without_autocast)

#: Weights with fewer elements take the two-node path (W' saved by conv/linear).
#: Rebuilding W' in backward costs one more backend forward per layer, a fixed few
#: launches that dominate for small weights, while saving W' costs numel·dtype
#: bytes: below 2^16 elements (256 KiB in fp32; ConvNeXt's depthwise 7x7 convs,
#: ResNet's stem and first-stage convs) the memory saved is not worth the time.
FUSE_MIN_NUMEL = 1 << 16


# -- the math, shared by the custom ops and the eager Function ----------------------
def _conv(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups):
    nd = w.dim() - 2
    return torch.ops.aten.convolution(x, w, bias, stride, padding, dilation, False,
                                      [0] * nd, groups)


def _slices(x, weight, be: Backend, conv) -> List[Tuple[int, int]]:
    """Row ranges ``(r0, n)`` of W' the conv layer runs one at a time (``conv_slice_rows``);
    one range, all rows, for most layers and always for grouped convs (a slice of output
    channels would need its groups' slice of x)."""
    if conv[3] != 1:
        return [(0, weight.shape[0])]
    return row_slices(weight.shape[0], be.conv_slice_rows(x, weight, conv))


def _conv_format(x: Tensor) -> torch.memory_format:
    """The memory format of a Lie conv layer's y and dx: channels_last when x is
    channels_last (4-D and not contiguous), else contiguous. ATen's convs give that for a
    contiguous weight; the layer holds to it whatever the layout of W or of a backend's W',
    so the fakes that ``torch.compile`` plans with can say it from x alone."""
    return (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def _empty_in_format(x: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised conv output or dx of ``shape``, x's dtype, in ``_conv_format(x)``."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x))


def _in_format(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``_conv_format(x)``: itself, or one copy when ATen chose otherwise."""
    fmt = _conv_format(x)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _forward(x, weight, bias, u, p, order, scale, be: Backend, conv):
    """``y``; ``conv`` is ``(stride, padding, dilation, groups)`` or None for Linear."""
    k = decode_order(order)
    if conv is None:
        return F.linear(x, be.forward_transient(weight, u, p, k, scale), bias)
    y = None
    for r0, n in _slices(x, weight, be, conv):
        w1 = be.forward_transient(row_slice(weight, r0, n), row_slice(u, r0, n), p, k, scale)
        part = _conv(x, w1, row_slice(bias, r0, n), *conv)
        if n == weight.shape[0]:
            return _in_format(part, x)
        if y is None:
            y = _empty_in_format(x, (part.shape[0], weight.shape[0], *part.shape[2:]))
        y.narrow(1, r0, n).copy_(part)
    return y


def _backward(grad_y, x, weight, u, p, order, scale, be: Backend, conv,
              need_x: bool, need_w: bool, need_b: bool, need_lie: bool):
    """``(dx, dW, dbias, du, dp)``, None where not asked for; W' and dL/dW' live one at a
    time. The layer ran in W's dtype (autocast takes the two-node path), so does this."""
    with without_autocast(grad_y.device):
        return _backward_math(grad_y, x, weight, u, p, order, scale, be, conv, need_x,
                              need_w, need_b, need_lie)


def _backward_math(grad_y, x, weight, u, p, order, scale, be: Backend, conv,
                   need_x: bool, need_w: bool, need_b: bool, need_lie: bool):
    k = decode_order(order)
    gx = gb = gw = du = dp = None
    if conv is None:
        g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        if need_b:
            gb = g2.sum(0)
        gx, gw, du, dp = be.linear_layer_backward(g2, x2, weight, u, p, k, scale, need_x,
                                                  need_w, need_lie)
        return None if gx is None else gx.view(x.shape), gw, gb, du, dp
    stride, padding, dilation, groups = conv
    args = (stride, padding, dilation, False, [0] * (weight.dim() - 2), groups)
    if need_x:
        for r0, n in _slices(x, weight, be, conv):
            w1 = be.forward_transient(row_slice(weight, r0, n), row_slice(u, r0, n), p, k, scale)
            part = torch.ops.aten.convolution_backward(
                grad_y.narrow(1, r0, n), x, w1, None, *args, [True, False, False])[0]
            del w1
            gx = part if gx is None else gx.add_(part)
        gx = _in_format(gx, x)
    if need_b:
        gb = grad_y.sum([0, *range(2, grad_y.dim())])
    if need_w or need_lie:
        gw, du, dp = be.conv_backward(grad_y, x, weight, u, p, k, scale, need_w, conv)
    return gx, gw, gb, du, dp


def _needs(needs_input_grad) -> Tuple[bool, bool, bool, bool]:
    nx, nw, nb, nu, np_ = needs_input_grad[:5]
    return nx, nw, nb, nu or np_


# -- torch.library custom ops (what torch.compile sees) -------------------------------
def _empty_or(t: Optional[Tensor], like: Tensor) -> Tensor:
    # a custom op cannot return None: an empty tensor stands for "not asked for"
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("lie_kernels::lie_linear", mutates_args=())
def lie_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], u: Tensor, p: Tensor,
               order: int, scale: float, backend: str) -> Tensor:
    be = resolve_backend(backend, weight, u, p, order)
    return _forward(x, weight, bias, u, p, order, scale, be, None)


@lie_linear.register_fake
def _(x, weight, bias, u, p, order, scale, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lie_kernels::lie_conv", mutates_args=())
def lie_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], u: Tensor, p: Tensor,
             order: int, scale: float, backend: str, stride: List[int], padding: List[int],
             dilation: List[int], groups: int) -> Tensor:
    be = resolve_backend(backend, weight, u, p, order)
    return _forward(x, weight, bias, u, p, order, scale, be, (stride, padding, dilation, groups))


@lie_conv.register_fake
def _(x, weight, bias, u, p, order, scale, backend, stride, padding, dilation, groups):
    return _empty_in_format(x, _conv(x, weight, bias, stride, padding, dilation, groups).shape)


_BWD_RESULT = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("lie_kernels::lie_linear_backward", mutates_args=())
def lie_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                        order: int, scale: float, backend: str, needs: List[bool]
                        ) -> _BWD_RESULT:
    be = resolve_backend(backend, weight, u, p, order)
    out = _backward(grad_y, x, weight, u, p, order, scale, be, None, *needs)
    return tuple(_empty_or(t, x) for t in out)


@torch.library.custom_op("lie_kernels::lie_conv_backward", mutates_args=())
def lie_conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                      order: int, scale: float, backend: str, stride: List[int],
                      padding: List[int], dilation: List[int], groups: int, needs: List[bool]
                      ) -> _BWD_RESULT:
    be = resolve_backend(backend, weight, u, p, order)
    out = _backward(grad_y, x, weight, u, p, order, scale, be,
                    (stride, padding, dilation, groups), *needs)
    return tuple(_empty_or(t, x) for t in out)


def _fake_backward(grad_y, x, weight, u, p, needs, conv: bool = False):
    need_x, need_w, need_b, need_lie = needs

    def like(t, need):
        return t.new_empty(t.shape if need else (0,))
    dx = _empty_in_format(x, x.shape) if conv and need_x else like(x, need_x)
    return (dx, like(weight, need_w), x.new_empty((weight.shape[0],) if need_b
                                                              else (0,)),
            like(u, need_lie), like(p, need_lie))


@lie_linear_backward.register_fake
def _(grad_y, x, weight, u, p, order, scale, backend, needs):
    return _fake_backward(grad_y, x, weight, u, p, needs)


@lie_conv_backward.register_fake
def _(grad_y, x, weight, u, p, order, scale, backend, stride, padding, dilation, groups,
      needs):
    return _fake_backward(grad_y, x, weight, u, p, needs, conv=True)


def _setup_context(ctx, inputs, output):
    x, weight, bias, u, p, order, scale, backend, *conv = inputs
    ctx.save_for_backward(x, weight, u, p)
    ctx.order, ctx.scale, ctx.backend, ctx.conv = order, scale, backend, conv


def _grads(ctx, out):
    return tuple(t if need else None for t, need in zip(out, ctx.needs_input_grad))


def _op_backward(ctx, grad_y):
    check_no_double_backward()
    x, weight, u, p = ctx.saved_tensors
    needs = list(_needs(ctx.needs_input_grad))
    if ctx.conv:
        out = lie_conv_backward(grad_y, x, weight, u, p, ctx.order, ctx.scale, ctx.backend,
                                *ctx.conv, needs)
    else:
        out = lie_linear_backward(grad_y, x, weight, u, p, ctx.order, ctx.scale, ctx.backend,
                                  needs)
    return _grads(ctx, out) + (None,) * (3 + len(ctx.conv))


for _op in (lie_linear, lie_conv):
    _op.register_autograd(_op_backward, setup_context=_setup_context)
for _op in (lie_linear_backward, lie_conv_backward):
    _op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)


# -- eager: the same math without the dispatcher ---------------------------------------
class _EagerLieLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, u, p, order, scale, be: Backend, conv):
        # a quantized W is frozen and no tensor: it rides on ctx (save_for_backward None)
        ctx.quantized = weight if isinstance(weight, QuantizedWeight) else None
        ctx.save_for_backward(x, None if ctx.quantized else weight, u, p)
        ctx.order, ctx.scale, ctx.be, ctx.conv = order, scale, be, conv
        return _forward(x, weight, bias, u, p, order, scale, be, conv)

    @staticmethod
    def backward(ctx, grad_y):
        check_no_double_backward()
        x, weight, u, p = ctx.saved_tensors
        weight = ctx.quantized or weight
        needs = _needs(ctx.needs_input_grad)
        out = _backward(grad_y, x, weight, u, p, ctx.order, ctx.scale, ctx.be, ctx.conv,
                        *needs)
        return _grads(ctx, out) + (None,) * 4

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(FORWARD_AD)


# -- entry point -----------------------------------------------------------------------
def fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether ``lie_layer`` runs the one-node path for these inputs.

    Autocast and mixed input/weight dtypes keep the two-node path: there F.conv/F.linear
    apply the autocast casts the user expects.
    """
    return (weight.numel() >= FUSE_MIN_NUMEL and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type))


def lie_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], u: Tensor, p: Tensor,
              order: Optional[int], scale: float, backend: str,
              conv: Optional[Sequence] = None) -> Tensor:
    """``conv/linear(x, W ⊙ exp_K(scale · (u @ p).view(W.shape)), bias)`` for checked inputs.

    ``conv`` is ``(stride, padding, dilation, groups)`` with int lists (padding
    already applied to ``x`` for non-zero padding modes and 'same'), or None for
    Linear. ``x`` is batched. Small weights (see ``FUSE_MIN_NUMEL``) run the weight
    op and the plain conv/linear as two nodes.
    """
    code = encode_order(order)
    if not fusable(x, weight):
        w1 = weight_op.apply(weight, u, p, order, scale, backend)
        return F.linear(x, w1, bias) if conv is None else _conv(x, w1, bias, *conv)
    if isinstance(weight, QuantizedWeight):
        return _quantized_layer(x, weight, bias, u, p, code, scale, backend)
    if torch.compiler.is_compiling():
        if conv is None:
            return lie_linear(x, weight, bias, u, p, code, scale, backend)
        stride, padding, dilation, groups = conv
        return lie_conv(x, weight, bias, u, p, code, scale, backend, list(stride),
                        list(padding), list(dilation), groups)
    be = select_backend(backend, weight, u, p, order)
    return _EagerLieLayer.apply(x, weight, bias, u, p, code, scale, be,
                                None if conv is None else tuple(conv))


@torch.compiler.disable
def _quantized_layer(x, weight: QuantizedWeight, bias, u, p, code: int, scale: float,
                     backend: str) -> Tensor:
    """A Linear layer on a quantized W: the eager node (the custom ops' schemas take a
    dense W only), also inside a compiled region (a graph break)."""
    be = select_backend(backend, weight, u, p, decode_order(code))
    return _EagerLieLayer.apply(x, weight, bias, u, p, code, scale, be, None)


def conv_geometry(conv: torch.nn.modules.conv._ConvNd, x: Tensor
                  ) -> Tuple[Tensor, Tuple[List[int], List[int], List[int], int], bool]:
    """``(x_padded, (stride, padding, dilation, groups), unbatched)`` of a conv layer.

    Non-zero padding modes and ``padding='same'`` pad ``x`` here with ``F.pad``
    exactly as ``_ConvNd._conv_forward`` does (so the saved input is the padded
    one, as there); the fused op then runs with padding 0.
    """
    nd = conv.weight.dim() - 2
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = [0] * nd
    elif padding == "valid":
        padding = [0] * nd
    elif padding == "same":
        x = F.pad(x, conv._reversed_padding_repeated_twice)
        padding = [0] * nd
    return x, (list(conv.stride), list(padding), list(conv.dilation), conv.groups), unbatched
