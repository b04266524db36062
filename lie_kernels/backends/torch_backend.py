"""Pure-PyTorch backend: works on any device, fast and memory-lean on CPU.

W is walked in row blocks of about ``CHUNK_ELEMS`` elements. For each block
the Δ rows come from one small GEMM into a reused buffer, the series is
evaluated in place (Horner, fp32 or fp64), and the result is fused with W in
one ``addcmul`` straight into the output. Peak extra memory is a few blocks,
never a tensor the size of W, and every pass over a block stays in cache.

On CPU the block buffers, and the W-sized tensors a Lie layer uses once (the W'
of ``forward_transient``, the dL/dW' of ``linear_backward``/``conv_backward``),
live in per-thread buffers reused from call to call (``_Arena``): a fresh
multi-MiB CPU tensor pays its page faults again on every call.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..quant import QuantizedWeight
from ..series import compute_dtype, exp_series_, expm1_series_
from .base import Backend, order_zero_backward, row_slice, row_slices, unfold

#: elements per row block (2 MiB of fp32 per buffer): fewer, larger blocks win, as every
#: op costs a fixed few µs to launch (measurements: docs/backends.md, CPU constants).
CHUNK_ELEMS = 1 << 19

#: exact exp, fp32/fp64 W below this many elements (256 KiB in fp32): the op saves W'
#: and its backward is t = g ⊙ W' and two small GEMMs, instead of rebuilding exp(s·x)
#: (a GEMM and an exp pass), which costs more on such small weights. The two-node Lie
#: layers (below ops.layer.FUSE_MIN_NUMEL) save W' for their conv anyway.
KEEP_OUTPUT_NUMEL = 1 << 16

#: the largest W' (in bytes) that ``forward_transient`` builds in the thread's reused
#: buffer: every conv of ResNet, ConvNeXt and SD-1.5 in fp32. Larger ones (big Linear
#: layers, whose GEMMs dwarf the page faults) are allocated per call.
TRANSIENT_MAX_BYTES = 64 << 20

#: on CPU a conv's dL/dW' is one GEMM, ``grad_y · im2col(x)ᵀ``, written into the
#: transient buffer, when its N·L output positions are at most this fraction of
#: C_out (im2col then holds at most that fraction of W's elements); else ATen's
#: weight gradient (oneDNN), which allocates dL/dW' afresh on every call. The GEMM wins
#: on small feature maps and loses once N·L passes C_out (docs/backends.md).
WGRAD_GEMM_POSITIONS = 0.25


class _Arena(threading.local):
    """Per-thread CPU buffers reused from call to call, one per named slot.

    A freshly allocated multi-MiB CPU tensor costs its page faults on first touch,
    on every call (the allocator hands big blocks back to the OS when they are
    freed), which can cost more than the conv that reads it.
    Buffers are uninitialised and never shrink; a slot serves one tensor at a time:
    the block slots within one backend call; "out", a W-sized transient (``_transient``;
    on the sliced conv route, a slice of W' or dL/dW'), until the thread's next one.
    """

    def __init__(self):
        self.slots: Dict[str, Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self.slots.get(slot)
        fits = buf is not None and buf.numel() >= nbytes
        if torch.jit.is_tracing() or (torch._C._len_torch_dispatch_stack() and (
                not fits or _tracing_mode())):
            # a trace would bake a kept buffer into its graph as a constant shared by
            # every caller (and a fake mode refuses a real one), and a buffer made under
            # any other dispatch mode could be a tensor of that mode: a fresh tensor
            # there, nothing kept (modes that only watch, e.g. counters, see reuse)
            return torch.empty(shape, dtype=dtype, device="cpu")
        if not fits:
            # on the CPU whatever the default device; a normal tensor even when first
            # asked for under inference_mode: views of an inference tensor are inference
            # tensors, which autograd refuses to save
            with torch.inference_mode(False):
                buf = self.slots[slot] = torch.empty(nbytes, dtype=torch.uint8,
                                                     device="cpu")
        return buf[:nbytes].view(dtype).view(*shape)


_ARENA = _Arena()

_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k)
                       for k in ("FAKE", "PROXY", "FUNCTIONAL"))


def _tracing_mode() -> bool:
    """Whether a dispatch mode that records rather than runs is active (``make_fx``,
    fake or functional tensors); ``torch.jit.trace`` is asked separately."""
    return any(torch._C._get_dispatch_mode(k) is not None for k in _TRACING_MODES)


def release_buffers() -> None:
    """Free the calling thread's reused CPU buffers (made again when next needed)."""
    _ARENA.slots.clear()


def _buffer(slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
            ) -> Tensor:
    """An uninitialised block buffer: the thread's reused one on CPU, a fresh one
    elsewhere (CUDA's caching allocator already reuses memory)."""
    if device.type == "cpu":
        return _ARENA.take(slot, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _transient(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised W-sized tensor used once: on CPU, up to ``TRANSIENT_MAX_BYTES``,
    the thread's reused "out" buffer (overwritten by the next one); else a fresh one."""
    if math.prod(shape) * dtype.itemsize > TRANSIENT_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return _buffer("out", shape, dtype, device)


def _output_positions(x: Tensor, weight: Tensor, conv) -> int:
    """N·L: the conv's output positions over the batch (L per sample)."""
    stride, padding, dilation, _ = conv
    n = x.shape[0]
    for size, k, s, pd, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation):
        n *= max(0, (size + 2 * pd - d * (k - 1) - 1) // s + 1)
    return n


def _gemm_route(x: Tensor, weight: Tensor, conv) -> bool:
    """Whether a CPU conv's dL/dW' is formed as GEMMs over im2col(x): groups 1, 1-D or
    2-D, fp32/fp64, contiguous W, at most ``WGRAD_GEMM_POSITIONS``·C_out output positions
    (there im2col(x) holds at most that fraction of W's elements)."""
    return (weight.device.type == "cpu" and conv[3] == 1 and weight.dim() in (3, 4)
            and weight.is_contiguous() and weight.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype
            and _output_positions(x, weight, conv) <= WGRAD_GEMM_POSITIONS * weight.shape[0])


def _slice_rows(weight: Tensor) -> int:
    """Rows of W in ``CHUNK_ELEMS`` elements (at least one): a slice on the GEMM route."""
    return max(1, CHUNK_ELEMS // max(1, math.prod(weight.shape[1:])))


def _gemm_operands(grad_y: Tensor, x: Tensor, weight: Tensor, conv) -> Tuple[Tensor, Tensor]:
    """``(grad_y as (C_out, N·L), im2col(x) as (N·L, C_in·k))``: dL/dW' of rows ``a:b``
    is ``gy[a:b] @ cols``, ``g[o, (c,k)] = Σ_(n,l) grad_y[n, o, l] · im2col(x)[n, (c,k), l]``."""
    stride, padding, dilation, _ = conv
    if weight.dim() == 3:  # a 1-D conv is a 2-D one of height 1
        grad_y, x, weight = grad_y.unsqueeze(2), x.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    cols = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    n, ck, positions = cols.shape
    rows = weight.shape[0]
    return (grad_y.reshape(n, rows, positions).transpose(0, 1).reshape(rows, n * positions),
            cols.transpose(1, 2).reshape(n * positions, ck))


def _rows_reader(weight, dtype: torch.dtype) -> Callable[[int, int], Tensor]:
    """``(r0, n) -> W[r0:r0+n]`` as ``(n, M)``: a view of a dense W, or the rows of a
    quantized W dequantized into a new block (``dtype``, the compute dtype; freed when the
    next one is read), so no dense copy of the whole weight ever exists. A new block, not
    a reused buffer: bitsandbytes' own kernel returns one, and copying it costs more."""
    if isinstance(weight, QuantizedWeight):
        return lambda r0, n: weight.rows(r0, n, dtype)
    w2 = unfold(weight)
    return lambda r0, n: row_slice(w2, r0, n)


def _block_rows(weight, rows: int, cols: int) -> int:
    """Rows of W per block of about ``CHUNK_ELEMS`` elements, at most ``rows``: for a
    quantized W, whole scale blocks (``QuantizedWeight.block_rows``)."""
    if isinstance(weight, QuantizedWeight):
        return min(rows, weight.block_rows(CHUNK_ELEMS))
    return min(rows, max(1, CHUNK_ELEMS // cols))


def _block_buffer(weight, slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised row-block buffer: the thread's reused one (``_buffer``) for a
    dense W; a fresh one for a quantized W, whose dequantized blocks come fresh from
    bitsandbytes anyway. So between calls a thread keeps nothing for a quantized W but the
    W-sized "out" (a quantized base is chosen for memory), and the fresh block costs no
    time next to the dequantization (docs/quantized.md)."""
    if isinstance(weight, QuantizedWeight):
        return torch.empty(shape, dtype=dtype, device=weight.device)
    return _buffer(slot, shape, dtype, weight.device)


def _empty_output(weight) -> Tensor:
    """A contiguous tensor of W's shape and (compute) dtype for W' or dW."""
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call (~1 µs) when it would be a no-op: a small
    weight's whole op costs tens of µs, so per-call overhead shows."""
    return t if t.dtype == dtype else t.to(dtype)


def _fix_nonfinite(out: Tensor, w: Tensor, e: Tensor, c: float) -> None:
    """Where W is ±inf, ``W + W·expm1`` is ``inf·0`` or ``inf - inf`` (NaN); there use
    the product ``W·exp_K`` itself, so W' == W at identity (expm1 = 0), inf included."""
    bad = ~torch.isfinite(w)
    out[bad] = (w[bad].to(e.dtype) * (1.0 + c * e[bad])).to(out.dtype)


def _store_series(o: Tensor, w: Tensor, x: Tensor, order: int, scale: float,
                  h: Optional[Tensor], ub: Tensor, pc: Tensor) -> None:
    """W' = W + W·expm1_K(s·x) of one block into ``o``, from ``x = u_b@p`` (overwritten;
    it may be ``o`` itself), with ``h`` the series' scratch (order >= 2)."""
    e, c = expm1_series_(x, order, h, scale)
    # computed in the promoted (fp32/fp64) dtype, cast on store (order 1 in place: e is
    # x, read and written element by element)
    torch.addcmul(w, w, e, value=c, out=o)
    if torch.isnan(o.sum()):  # one in-cache pass; a bool reduction costs 100x more
        _fix_nonfinite(o, w, torch.mm(ub, pc) if e is o else e, c)


class TorchBackend(Backend):
    name = "torch"
    priority = 0

    def availability(self) -> Tuple[bool, str]:
        return True, "pure PyTorch, any device"

    def not_supported_reasons(self, weight, u, p, order) -> list:
        return []

    def keeps_output(self, weight: Tensor, order: Optional[int]) -> bool:
        return (order is None and weight.numel() < KEEP_OUTPUT_NUMEL
                and weight.dtype in (torch.float32, torch.float64))

    def output_backward(self, grad: Tensor, out: Tensor, u: Tensor, p: Tensor,
                        scale: float) -> Tuple[Tensor, Tensor]:
        t = torch.mul(unfold(grad), unfold(out))  # kept only for fp32/fp64 W: t in W's dtype
        uc, pc = _cast(u, t.dtype), _cast(p, t.dtype)
        du, dp = t.mm(pc.t()), uc.t().mm(t)
        if scale != 1.0:
            du.mul_(scale), dp.mul_(scale)
        return _cast(du, u.dtype), _cast(dp, p.dtype)

    def forward(self, weight: Tensor, u: Tensor, p: Tensor,
                order: Optional[int], scale: float) -> Tensor:
        return self._build(weight, u, p, order, scale, _empty_output(weight))

    def forward_transient(self, weight: Tensor, u: Tensor, p: Tensor,
                          order: Optional[int], scale: float) -> Tensor:
        """On CPU, up to ``TRANSIENT_MAX_BYTES``: W' in the thread's reused "out" buffer."""
        return self._build(weight, u, p, order, scale,
                           _transient(weight.shape, weight.dtype, weight.device))

    def linear_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                        p: Tensor, order: Optional[int], scale: float, need_dw: bool
                        ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """dL/dW' = grad_yᵀ x in the transient buffer (on CPU: no fresh W-sized tensor)."""
        g = torch.mm(grad_y.t(), x, out=_transient(weight.shape, x.dtype, weight.device))
        return self.backward(g, weight, u, p, order, scale, need_dw, True)

    def linear_layer_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                              p: Tensor, order: Optional[int], scale: float, need_dx: bool,
                              need_dw: bool, need_lie: bool):
        """dL/dW' = grad_yᵀ x in the transient buffer, then the Lie backward, which writes
        each block's W' rows over the dL/dW' rows it has used (``_backward``'s
        ``rebuild``); dx = grad_y W' from there. W's rows are read (a quantized W:
        dequantized) once instead of twice, and W' needs no second W-sized tensor.
        Taken when the factors and x need gradients and W does not, with dL/dW' in the
        compute dtype (an fp32/fp64 W, or a quantized W computing in fp32); otherwise
        the default."""
        if not (need_dx and need_lie and not need_dw and order != 0
                and x.dtype == grad_y.dtype == compute_dtype(weight.dtype)):
            return super().linear_layer_backward(grad_y, x, weight, u, p, order, scale,
                                                 need_dx, need_dw, need_lie)
        g = torch.mm(grad_y.t(), x, out=_transient(weight.shape, x.dtype, weight.device))
        _, du, dp = self._backward(g, weight, u, p, order, scale, False, True, rebuild=True)
        return grad_y.mm(g.view(grad_y.shape[1], -1)), None, du, dp

    def conv_slice_rows(self, x: Tensor, weight: Tensor, conv) -> int:
        """On the GEMM route (``_gemm_route``: a big W on small feature maps), slices of
        ``CHUNK_ELEMS`` elements: a slice of W' or dL/dW' is all the reused buffer holds,
        for a few percent more time on such layers."""
        return _slice_rows(weight) if _gemm_route(x, weight, conv) else weight.shape[0]

    def conv_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                      p: Tensor, order: Optional[int], scale: float, need_dw: bool,
                      conv) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """On the GEMM route (``_gemm_route``), dL/dW' as GEMMs over im2col(x), one
        ``conv_slice_rows`` slice at a time into the transient buffer, each followed by its
        rows' backward; otherwise the default (ATen's weight gradient)."""
        if not (_gemm_route(x, weight, conv) and grad_y.dtype == weight.dtype):
            return super().conv_backward(grad_y, x, weight, u, p, order, scale, need_dw, conv)
        gy, cols = _gemm_operands(grad_y, x, weight, conv)
        parts = []
        for r0, n in row_slices(weight.shape[0], _slice_rows(weight)):
            g = torch.mm(row_slice(gy, r0, n), cols,
                         out=_transient((n, cols.shape[1]), weight.dtype, weight.device))
            w = row_slice(weight, r0, n)
            parts.append(self.backward(g.view(w.shape), w, row_slice(u, r0, n), p, order,
                                       scale, need_dw, True))
        if len(parts) == 1:
            return parts[0]
        dws, dus, dps = zip(*parts)
        dp = dps[0]
        for d in dps[1:]:
            dp.add_(d)
        return torch.cat(dws) if need_dw else None, torch.cat(dus), dp

    def _build(self, weight: Tensor, u: Tensor, p: Tensor, order: Optional[int],
               scale: float, result: Tensor) -> Tensor:
        """W' into ``result`` (contiguous, W's shape and dtype), which it returns."""
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        out = result.view(rows, cols)  # what the loop writes
        cd = compute_dtype(weight.dtype)
        step = _block_rows(weight, rows, cols)
        w_rows = _rows_reader(weight, cd)
        if order == 0:
            for r0, n in row_slices(rows, step):
                row_slice(out, r0, n).copy_(w_rows(r0, n))
            return result
        exact = order is None
        # exact exp: the scale rides on the GEMM (alpha) and W' = W·exp(s·x) is one
        # multiply, an fp32 product rounded once (no "1 + small" to lose bits in).
        # With W in the compute dtype, x is formed in the output's own rows (no x buffer)
        uc, pc = _cast(u, cd), _cast(p, cd)
        alpha = scale if exact else 1.0
        in_out = out.dtype == cd
        xbuf = None if in_out else _block_buffer(weight, "x", (step, cols), cd)
        hbuf = _block_buffer(weight, "h", (step, cols), cd) if order not in (None, 1) else None
        for r0, n in row_slices(rows, step):
            w, o, ub = w_rows(r0, n), row_slice(out, r0, n), row_slice(uc, r0, n)
            x = (o if in_out else row_slice(xbuf, 0, n)).addmm_(ub, pc, beta=0, alpha=alpha)
            if exact and in_out:  # in place, not out=: a make_fx graph replays this op
                x.exp_().mul_(w)  # with tensors that need grad, which out= refuses
            elif exact:
                torch.mul(w, x.exp_(), out=o)
            else:
                _store_series(o, w, x, order, scale, row_slice(hbuf, 0, n), ub, pc)
        return result

    def backward(self, grad: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                 order: Optional[int], scale: float, need_dw: bool,
                 overwrite_grad: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """With ``overwrite_grad``, order 1 forms t = g ⊙ W in g itself: no block buffer.
        So does every order on a quantized W (fp32 g), whose rows come dequantized into a
        new block (``_rows_reader``) that is scratch once read: t = (g ⊙ W) ⊙
        exp_{K-1}(s·x) with x and the series where W's block was (exact exp and order 1:
        no block buffer; order K: one, for x)."""
        return self._backward(grad, weight, u, p, order, scale, need_dw, overwrite_grad)

    def _backward(self, grad: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                  order: Optional[int], scale: float, need_dw: bool, overwrite_grad: bool,
                  rebuild: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """``backward``; with ``rebuild`` (needs ``overwrite_grad``, no dW, g in the
        compute dtype) each block's W' rows are then written over its g rows, so ``grad``
        holds W' on return: t in g, then W' = W ⊙ exp_K(s·x) from the same x (order 1:
        x formed in g once t is used; order K: one more block buffer, the series')."""
        if order == 0:
            return order_zero_backward(grad, weight, u, p, need_dw)
        g2 = unfold(grad)
        rows, cols = g2.shape
        cd = compute_dtype(weight.dtype)
        dw = _empty_output(weight) if need_dw else None
        dw2 = None if dw is None else dw.view(rows, cols)
        exact = order is None
        # exact exp: as in forward x = s·u@p (GEMM alpha), so exp(x) needs no scaling pass
        uc, pc = _cast(u, cd), _cast(p, cd)
        alpha, xs = (scale, 1.0) if exact else (1.0, scale)
        du = torch.empty((rows, u.shape[1]), dtype=cd, device=weight.device)
        # W's block is kept for W' when rebuilding, else a quantized one is scratch
        scratch_w = (isinstance(weight, QuantizedWeight) and overwrite_grad
                     and g2.dtype == cd and not rebuild)
        # order 1: exp_0 = 1, Δ is not needed; exact exp on a scratch W: x where W was
        need_x = need_dw or (order != 1 and not (exact and scratch_w))
        step = _block_rows(weight, rows, cols)
        w_rows = _rows_reader(weight, cd)
        single = step == rows  # one block: dp is one GEMM, no zero-filled accumulator
        dp = None if single else torch.zeros((p.shape[0], cols), dtype=cd, device=weight.device)
        xbuf = _block_buffer(weight, "x", (step, cols), cd) if need_x else None
        in_grad = scratch_w or rebuild or (overwrite_grad and order == 1 and not need_dw
                                           and g2.dtype == cd)
        # exact exp: t is formed in g or in x's buffer (exp in place), no second buffer
        series_buf = not (exact or scratch_w or (in_grad and order == 1))
        tbuf = _block_buffer(weight, "h", (step, cols), cd) if series_buf else None
        for r0, n in row_slices(rows, step):
            w, g, ub = w_rows(r0, n), row_slice(g2, r0, n), row_slice(uc, r0, n)
            h = row_slice(tbuf, 0, n)
            if need_x:
                x = row_slice(xbuf, 0, n).addmm_(ub, pc, beta=0, alpha=alpha)
            # t = g ⊙ W ⊙ exp_{K-1}(s·x) = dL/d(s·x) (exact exp: g ⊙ W ⊙ exp(s·x));
            # dW = g ⊙ exp_K(s·x)
            if in_grad:  # beyond order 1 only on a scratch (quantized) W's block or rebuilding
                t = g.mul_(w)
                if exact:
                    t.mul_((x if rebuild else w.addmm_(ub, pc, beta=0, alpha=alpha)).exp_())
                elif order != 1:
                    t.mul_(exp_series_(x, order - 1, h if rebuild else w, xs))
            elif exact:
                e = x.exp_()
                if need_dw:
                    torch.mul(g, e, out=row_slice(dw2, r0, n))
                t = e.mul_(g).mul_(w)
            else:
                t = h
                if need_dw:
                    torch.mul(g, exp_series_(x, order, t, xs), out=row_slice(dw2, r0, n))
                if order == 1 and w.dtype == cd:
                    torch.mul(g, w, out=t)
                elif order == 1:  # 16-bit: torch.mul(g, w, out=t) would round g·W to 16 bits
                    t.copy_(g).mul_(w)
                else:
                    exp_series_(x, order - 1, t, xs).mul_(g).mul_(w)
            # du = s·t pᵀ, dp = s·uᵀ t: the scale rides on the GEMMs
            row_slice(du, r0, n).addmm_(t, pc.t(), beta=0, alpha=scale)
            if single:
                dp = torch.mm(ub.t(), t) if scale == 1.0 else ub.t().mm(t).mul_(scale)
            else:
                dp.addmm_(ub.t(), t, alpha=scale)
            if rebuild:  # t is used: W' of these rows where it was (exact: x holds exp(s·x))
                if exact:
                    torch.mul(w, x, out=g)
                else:
                    _store_series(g, w, x if order != 1 else g.addmm_(ub, pc, beta=0), order,
                                  scale, h, ub, pc)
        return dw, _cast(du, u.dtype), _cast(dp, p.dtype)


BACKEND = TorchBackend()
