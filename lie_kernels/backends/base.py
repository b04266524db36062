"""The contract every backend implements.

All backends compute the same function on the ``(C_out, M)`` unfolding of a
weight ``W`` (any 2-5 dim tensor whose trailing dims flatten to ``M``)::

    x   = scale * (u @ p)                       # Δ_(1) = u @ p, never stored whole
    W'  = W + W ⊙ expm1_K(x)                    # K = order; None = exact exp

and its backward, with ``g = dL/dW'``::

    t   = g ⊙ W ⊙ exp_{K-1}(x)                  # exact exp: g ⊙ W ⊙ exp(x)
    du  = scale * t @ pᵀ,   dp = scale * uᵀ @ t
    dW  = g ⊙ exp_K(x)

``u`` is ``(C_out, r)`` and ``p`` is ``(r, M)``, on W's device (checked before a
backend is called). Each of them has W's dtype or, for a 16-bit W, fp32 (PEFT's
default autocast keeps adapter factors in fp32; the math is fp32 inside anyway).
``order`` is an int >= 0 or None. W may be any strided view (channels_last
included); its offsets may pass 2**31 elements: a backend either indexes it
safely or refuses it in ``not_supported_reasons``. W may also be a frozen
``quant.QuantizedWeight`` (4/8-bit, 2-D): then ``W`` above is ``deq(W)``, W' has its
compute dtype (``weight.dtype``), dW is never asked for, and a backend reads the packed
weight a block or tile at a time (never a dense copy of it) or refuses it.

Outputs: ``forward`` returns a tensor of W's shape and dtype, laid out in W's
memory order when W is a dense permutation (e.g. channels_last), else
contiguous; ``backward`` returns ``(dw, du, dp)`` with ``dw`` in W's dtype and
layout (None unless asked for) and ``du``/``dp`` in ``u``'s/``p``'s dtypes.
Nothing the size of W may be kept between the two calls, with one exception a
backend opts into: ``keeps_output`` lets the op save W' itself for a small
weight, for ``output_backward``, where rebuilding costs more than W' weighs.
``linear_backward`` and ``conv_backward`` are the seams for a Lie layer whose
``dL/dW'`` comes from its input and output gradient (Linear: ``grad_yᵀ @ x``): a
backend may fuse that product with its backward so ``dL/dW'`` is never written, or
form it where it likes (the torch backend: in a reused CPU buffer).
``linear_layer_backward`` is the seam for a Lie Linear layer's whole backward (dx too),
where a backend may build the W' that dx needs inside its Lie backward.
``conv_slice_rows`` lets a backend run a Lie conv layer a few output channels at a time,
so that only a slice of W' (and of dL/dW') is alive at once.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..quant import QuantizedWeight


class Backend:
    """Base class; subclasses override the four methods below (and may override the
    optional ones after them)."""

    #: registry key, e.g. "torch", "triton", "cuda"
    name: str = ""
    #: preference when ``backend="auto"`` (higher wins among usable ones)
    priority: int = 0

    def availability(self) -> Tuple[bool, str]:
        """(usable in this process at all, human-readable reason)."""
        raise NotImplementedError

    def auto_priority(self, weight: Tensor) -> Optional[int]:
        """Rank for ``backend="auto"`` on W's device; None = never picked automatically."""
        return self.priority

    def not_supported_reasons(self, weight: Tensor, u: Tensor, p: Tensor,
                              order: Optional[int]) -> list:
        """Why this backend cannot take these inputs; empty list = it can."""
        raise NotImplementedError

    def forward(self, weight: Tensor, u: Tensor, p: Tensor,
                order: Optional[int], scale: float) -> Tensor:
        raise NotImplementedError

    def backward(self, grad: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                 order: Optional[int], scale: float, need_dw: bool,
                 overwrite_grad: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """``overwrite_grad``: ``grad`` is a scratch tensor the caller formed and drops
        afterwards (the dL/dW' of ``linear_backward``/``conv_backward``), which the
        backend may overwrite (the torch backend forms t = g ⊙ W in it at order 1);
        otherwise ``grad`` is read only."""
        raise NotImplementedError

    def forward_transient(self, weight: Tensor, u: Tensor, p: Tensor,
                          order: Optional[int], scale: float) -> Tensor:
        """``forward`` for a W' the caller uses at once and drops (what a Lie layer
        feeds its conv/linear): a backend may build it in a buffer it reuses, valid
        until its next ``forward_transient`` on this thread. Default: ``forward``."""
        return self.forward(weight, u, p, order, scale)

    def keeps_output(self, weight: Tensor, order: Optional[int]) -> bool:
        """Whether the op should save W' for ``output_backward`` (asked only when W
        itself needs no gradient) instead of calling ``backward``; true only for the
        exact exp, the one order where ``t`` follows from W'. Default: never."""
        return False

    def output_backward(self, grad: Tensor, out: Tensor, u: Tensor, p: Tensor,
                        scale: float) -> Tuple[Tensor, Tensor]:
        """``(du, dp)`` of the exact exp from the saved ``out`` = W' = W ⊙ exp(s·x):
        there ``t = g ⊙ W ⊙ exp(s·x) = g ⊙ W'``, so nothing is rebuilt."""
        raise NotImplementedError

    def linear_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                        p: Tensor, order: Optional[int], scale: float, need_dw: bool
                        ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """``backward`` with ``g = grad_yᵀ @ x`` for a Linear layer: ``grad_y`` is
        ``(N, C_out)`` and ``x`` is ``(N, C_in)``. This default forms ``g``; a backend
        with a kernel that consumes ``grad_y`` and ``x`` directly overrides it."""
        return self.backward(grad_y.t().mm(x), weight, u, p, order, scale, need_dw, True)

    def linear_layer_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                              p: Tensor, order: Optional[int], scale: float, need_dx: bool,
                              need_dw: bool, need_lie: bool
                              ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                         Optional[Tensor]]:
        """``(dx, dW, du, dp)`` of a Lie Linear layer ``y = x W'ᵀ`` (None where not asked
        for; ``grad_y`` is ``(N, C_out)``, ``x`` is ``(N, C_in)``): ``dx = grad_y W'``, the
        rest from ``linear_backward``. This default rebuilds W' for dx
        (``forward_transient``) and drops it before ``linear_backward`` runs, so one
        W-sized temporary is alive at a time; a backend may build W' inside its Lie
        backward instead, where W's rows are already at hand (the torch backend does)."""
        dx = dw = du = dp = None
        if need_dx:
            dx = grad_y.mm(self.forward_transient(weight, u, p, order, scale))
        if need_dw or need_lie:
            dw, du, dp = self.linear_backward(grad_y, x, weight, u, p, order, scale, need_dw)
        return dx, dw, du, dp

    def conv_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                      p: Tensor, order: Optional[int], scale: float, need_dw: bool,
                      conv: Tuple[Sequence[int], Sequence[int], Sequence[int], int]
                      ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """``backward`` with ``g = dL/dW'`` of ``y = conv(x, W')``: ``x`` and ``grad_y``
        are batched, ``conv`` is ``(stride, padding, dilation, groups)`` as int lists.
        This default forms ``g`` with ATen's convolution weight gradient, which reads
        only W's shape, never W' itself."""
        stride, padding, dilation, groups = conv
        _, g, _ = torch.ops.aten.convolution_backward(
            grad_y, x, weight, None, stride, padding, dilation, False,
            [0] * (weight.dim() - 2), groups, [False, True, False])
        return self.backward(g, weight, u, p, order, scale, need_dw, True)

    def conv_slice_rows(self, x: Tensor, weight: Tensor,
                        conv: Tuple[Sequence[int], Sequence[int], Sequence[int], int]) -> int:
        """How many output channels of a Lie conv layer (rows of W') to build and use at a
        time. A layer runs its conv and its input gradient once per slice of that many
        rows, so only one slice of W' is alive at a time. Asked for groups 1 only (a grouped
        conv always runs whole). Default: all of them (one slice)."""
        return weight.shape[0]

    def forward_many(self, weights: Sequence[Tensor], us: Sequence[Tensor],
                     ps: Sequence[Tensor], order: Optional[int], scales: Sequence[float]
                     ) -> List[Tensor]:
        """``forward`` for many layers at once; backends with a grouped kernel override it."""
        return [self.forward(w, u, p, order, s) for w, u, p, s in zip(weights, us, ps, scales)]


def unfold(t: Tensor) -> Tensor:
    """``(C_out, M)`` view of ``t`` when its strides allow one, else a copy."""
    rows = t.shape[0]
    try:
        return t.view(rows, -1)
    except RuntimeError:
        return t.reshape(rows, -1)


def row_slice(t: Optional[Tensor], r0: int, n: int) -> Optional[Tensor]:
    """Rows ``r0:r0+n`` of ``t``; ``t`` itself when that is all of it (a small weight is
    one block, and there the ~8 slices per call were a third of the time, ~3 µs each);
    None stays None."""
    return t if t is None or (r0 == 0 and n == t.shape[0]) else t.narrow(0, r0, n)


def row_slices(rows: int, step: int) -> List[Tuple[int, int]]:
    """``(r0, n)`` ranges covering ``rows`` rows, at most ``step`` each, sizes balanced."""
    count = max(1, -(-rows // max(1, step)))
    bounds = [rows * i // count for i in range(count + 1)]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


def memory_order(t: Tensor) -> Tuple[int, ...]:
    """Trailing dims of ``t`` in the order its memory holds them: ``(1, 2, ...)`` when
    the logical ``(C_out, M)`` unfolding is a view, else sorted by decreasing stride
    (channels_last ``(O, I, H, W)`` gives ``(2, 3, 1)``)."""
    trailing = tuple(range(1, t.dim()))
    if rows_view(t, trailing) is not None:
        return trailing
    return tuple(sorted(trailing, key=lambda d: -t.stride(d)))


def rows_view(t: Tensor, perm: Sequence[int]) -> Optional[Tensor]:
    """``(C_out, M)`` view of ``t`` with its columns in ``perm`` order, or None when
    the strides allow no such view (never a copy)."""
    try:
        return t.permute(0, *perm).view(t.shape[0], -1)
    except RuntimeError:
        return None


def rows_in_order(t: Tensor, perm: Sequence[int]) -> Tensor:
    """``rows_view(t, perm)``, or one copy into that layout when ``t`` is laid out
    unlike W (e.g. a gradient in another memory format)."""
    t2 = rows_view(t, perm)
    return t.permute(0, *perm).reshape(t.shape[0], -1) if t2 is None else t2


def empty_in_order(t: Tensor, perm: Sequence[int]) -> Tensor:
    """Uninitialised tensor like ``t`` (shape, dtype, device) whose ``rows_view`` along
    ``perm`` exists: ``t``'s own layout when ``t`` is dense, else packed in ``perm`` order."""
    out = torch.empty_like(t)
    if rows_view(out, perm) is not None:
        return out
    packed = torch.empty((t.shape[0], t.shape[1:].numel()), dtype=t.dtype, device=t.device)
    return rows_to_weight(packed, t.shape, perm)


def rows_to_weight(t2: Tensor, shape: Sequence[int], perm: Sequence[int]) -> Tensor:
    """A contiguous ``(R, M)`` tensor whose columns are in ``perm`` order, seen as a
    ``shape`` tensor (a view; ``t2`` is its ``rows_view`` along ``perm``)."""
    packed = t2.view(t2.shape[0], *[shape[d] for d in perm])
    return packed.permute(0, *[1 + list(perm).index(d) for d in range(1, len(shape))])


def weight_rows(weight: Tensor, p: Tensor) -> Tuple[Tensor, Tensor, Tuple[int, ...]]:
    """W's ``(R, M)`` view in memory order (a copy only when W is no dense permutation),
    p's columns in that order, and the order (``memory_order``)."""
    perm = memory_order(weight)
    w2 = rows_view(weight, perm)
    if w2 is None:
        perm = tuple(range(1, weight.dim()))
        w2 = weight.reshape(weight.shape[0], -1)
    return w2, columns_to_order(p, weight.shape, perm), perm


def columns_to_order(p: Tensor, shape: Sequence[int], perm: Sequence[int]) -> Tensor:
    """``p`` ``(r, M)`` with its columns (logical order of ``shape[1:]``) reordered
    to ``perm``; a view when ``perm`` is the identity, else a small copy."""
    if tuple(perm) == tuple(range(1, len(shape))):
        return p
    return p.reshape(p.shape[0], *shape[1:]).permute(0, *perm).reshape(p.shape[0], -1)


def columns_from_order(q: Tensor, shape: Sequence[int], perm: Sequence[int]) -> Tensor:
    """Inverse of ``columns_to_order``: ``(r, M)`` in ``perm`` order back to logical order."""
    if tuple(perm) == tuple(range(1, len(shape))):
        return q
    inv = [1 + list(perm).index(d) for d in range(1, len(shape))]
    return (q.reshape(q.shape[0], *[shape[d] for d in perm]).permute(0, *inv)
            .reshape(q.shape[0], -1))


def order_zero_backward(grad: Tensor, weight: Tensor, u: Tensor, p: Tensor, need_dw: bool
                        ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """Order 0: exp_0 = 1, so W' = W; dW = g and the factors get no gradient."""
    dw = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device).copy_(grad)
          if need_dw else None)
    return dw, torch.zeros_like(u), torch.zeros_like(p)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Highest finite order the compiled kernels unroll (Triton and ``csrc/lie_series.cuh``'s
#: ``kMaxOrder``); the public bound, ``order.MAX_ORDER``, is the torch backend's.
KERNEL_MAX_ORDER = 8


def kernel_limits(weight: Tensor, u: Tensor, order: Optional[int], max_rank: int,
                  quantized_kinds: Sequence[str] = ()) -> list:
    """Reasons a compiled kernel (fp32/fp16/bf16, orders 0..KERNEL_MAX_ORDER or exact,
    rank <= max_rank, quantized W of ``quantized_kinds`` only) cannot take these inputs;
    a quantized W's dtype is its compute dtype."""
    max_order = KERNEL_MAX_ORDER
    reasons = []
    if isinstance(weight, QuantizedWeight) and weight.kind not in quantized_kinds:
        reasons.append(f"a {weight.kind} quantized weight is not read by this backend's "
                       f"kernels (the torch backend takes it)")
    if weight.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {weight.dtype} is not supported (fp32, fp16, bf16)")
    if order is not None and order > max_order:
        reasons.append(f"order {order} > {max_order} (orders 0..{max_order} or exact)")
    if u.shape[1] > max_rank:
        reasons.append(f"rank {u.shape[1]} > {max_rank}")
    return reasons
