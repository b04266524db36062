"""Triton backend: the fused kernels of ``triton_kernels.py`` behind the Backend contract.

On CUDA tensors the kernels are compiled for the GPU. With ``TRITON_INTERPRET=1``
they run in Triton's interpreter on CPU tensors, which is how they are tested on
machines without a GPU (slow: ``auto`` never picks it there).

W is read in place in its memory order (``channels_last`` and other dense
permutations included: ``p``'s columns, a small tensor, are reordered instead),
and W', dW come back in W's layout. A ``QuantizedWeight`` (nf4, fp4, int8, fp8) is
read from its packed bytes and dequantized tile by tile in registers; its W' is
contiguous in its compute dtype. Launch shapes depend only on the tensor
shapes, never on the GPU model, so results are bitwise the same on every GPU.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import nullcontext
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..order import derivative_code, encode_order
from ..quant import QuantizedWeight
from .base import (Backend, columns_from_order, empty_in_order, kernel_limits,
                   order_zero_backward, rows_in_order, rows_to_weight, rows_view,
                   weight_rows)
from .triton_configs import QUANTIZED_FORMATS, Config, config
from .workspace import Workspace

try:
    import triton
    import triton.language as tl
    from . import triton_kernels as kernels
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                  torch.bfloat16: tl.bfloat16}
    #: a quantized kind -> the kernels' W_FMT
    _W_FMT = {"nf4": kernels.W_4BIT, "fp4": kernels.W_4BIT, "int8": kernels.W_INT8,
              "fp8": kernels.W_FP8}
    _IMPORT_ERROR = None
except ImportError as exc:  # triton is optional
    _IMPORT_ERROR = exc

MAX_RANK = 128  # the whole padded rank lives in one register tile
#: smallest 4-bit blocksize the kernels read (``triton_kernels._w4_tile``)
QBLOCK_MIN = 32
#: programs of the backward (rows splits × column splits): a constant, not a function
#: of the SM count, so the reduction order is the same on every GPU
BWD_PROGRAMS = 256
REDUCE_BLOCK = 1024
#: row tiles per program group of the fused Linear backward (x slices reused through L2)
LINEAR_GROUP = 8
#: the backward's fp32 scratch, kept zeroed between calls (no memset launch per call)
_WORKSPACE = Workspace()
#: fp32 scratch the backward overwrites whole (deterministic dp partials), reused unzeroed
_STORED = Workspace(zeroed=False)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _interp_linear_config(rows: int, cols: int, n: int) -> Config:
    """Interpreter: big tiles (``n`` may be 0, an empty batch: any BLOCK_N >= 1 works)."""
    return Config(min(64, triton.next_power_of_2(rows)), min(128, triton.next_power_of_2(cols)),
                  4, 1, min(64, triton.next_power_of_2(max(n, 1))))


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _interp_config(rows: int, cols: int) -> Config:
    """Interpreter: one big tile per small problem (~4 ms per program there)."""
    return Config(min(64, triton.next_power_of_2(rows)), min(256, triton.next_power_of_2(cols)),
                  4, 1)


def dot_mode(dtype: torch.dtype) -> int:
    """16-bit MMA for fp16/bf16 W; fp32 FMA for fp32 W (see triton_kernels: tf32
    misses the 1e-4 budget) and in the interpreter (its bf16 dot is wrong)."""
    if _interpreting() or dtype == torch.float32:
        return kernels.DOT_IEEE
    return kernels.DOT_16


def bwd_splits(row_blocks: int, col_tiles: int, rows: int, cols: int) -> Tuple[int, int]:
    """(row splits, column splits) for about ``BWD_PROGRAMS`` programs (powers of two
    for the rows), chosen so the partials, ``row_splits·r·M + col_splits·R·r``
    floats, are smallest (near ``row_splits·M = col_splits·R``)."""
    best = None
    s_r = 1
    while s_r <= row_blocks:
        s_c = max(1, min(col_tiles, BWD_PROGRAMS // s_r))
        cost = s_r * cols + s_c * rows
        if best is None or cost < best[0]:
            best = (cost, s_r, s_c)
        s_r *= 2
    return best[1], best[2]


def deterministic() -> bool:
    """The backward's reduction: ordered split sums (bitwise the same on every run and
    every GPU) under ``torch.use_deterministic_algorithms(True)``, fp32 atomics otherwise,
    as PyTorch's own CUDA ops do."""
    return torch.are_deterministic_algorithms_enabled()


class WOperand(NamedTuple):
    """W as the kernels read it: ``data`` (R, M rows for a dense W; the flat stored
    bytes of a quantized one) with its (row, column) strides in storage elements, the
    dequantization's ``code`` table and ``scales`` (where a format has none, another of
    these tensors: never read), the ``W_FMT``/``QBLOCK`` constexprs and the format's name
    in the tile table."""
    data: Tensor
    code: Tensor
    scales: Tensor
    strides: Tuple[int, int]
    fmt: int
    qblock: int
    name: str

    def kernel_args(self) -> tuple:
        return self.data, self.code, self.scales

    def constexprs(self) -> dict:
        return dict(W_FMT=self.fmt, QBLOCK=self.qblock)


def w_operand(weight) -> WOperand:
    """The operand of a QuantizedWeight, or of a dense W already seen as (R, M) rows."""
    if not isinstance(weight, QuantizedWeight):
        return WOperand(weight, weight, weight, weight.stride(), kernels.W_DENSE, 0, "dense")
    fmt, name, cols = _W_FMT[weight.kind], QUANTIZED_FORMATS[weight.kind], weight.shape[1]
    if weight.packed:
        return WOperand(weight.data, weight.code, weight.scales, (cols // 2, 1), fmt,
                        weight.blocksize, name)
    return WOperand(weight.data, weight.scales, weight.scales, (cols, 1), fmt, 0, name)


def _operands(weight, p: Tensor) -> Tuple[WOperand, Tensor, Tuple[int, ...]]:
    """``(W operand, p's columns in W's memory order, that order)`` (``weight_rows``);
    a quantized W is 2-D and contiguous."""
    if isinstance(weight, QuantizedWeight):
        return w_operand(weight), p, (1,)
    w2, pm, perm = weight_rows(weight, p)
    return w_operand(w2), pm, perm


def _empty_output(weight, perm: Tuple[int, ...]) -> Tensor:
    """W' (or dW) in W's layout (``empty_in_order``); contiguous for a quantized W."""
    if isinstance(weight, QuantizedWeight):
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return empty_in_order(weight, perm)


def quantized_limits(weight: QuantizedWeight) -> list:
    """Why the kernels cannot read this quantized W (``triton_kernels``: quantized W)."""
    reasons = []
    if weight.packed and weight.shape[1] % 2:
        reasons.append(f"a {weight.kind} weight with an odd number of columns "
                       f"({weight.shape[1]}) is not read by the Triton kernels: they load "
                       f"whole bytes per row, and here rows start mid-byte")
    if weight.packed and (weight.blocksize % 2 or weight.blocksize < QBLOCK_MIN):
        reasons.append(f"a {weight.kind} weight's blocksize must be even and at least "
                       f"{QBLOCK_MIN} for the Triton kernels (bitsandbytes': 32 to 4096), "
                       f"got {weight.blocksize}: a byte's two codes share one absmax, a "
                       f"16-byte load at most two")
    if (weight.kind == "fp8" and weight.is_cuda
            and torch.cuda.get_device_capability(weight.device) < (8, 9)):
        reasons.append("an fp8 weight needs a GPU with fp8 conversions (sm_89 or newer)")
    return reasons


class BwdPlan(NamedTuple):
    """How one backward launch is cut: tiles, each program's run of row blocks and
    column tiles, the split counts, and the reduction (``lie_bwd_kernel``'s docstring)."""
    cfg: Config
    rb_per: int
    ct_per: int
    row_splits: int
    col_splits: int
    atomic: bool

    def scratch_floats(self, rows: int, cols: int, rank: int) -> int:
        """fp32 scratch beyond the outputs: the atomic accumulators, or the split partials."""
        if self.atomic:
            return rank * (rows + cols)
        return rank * (self.col_splits * rows + self.row_splits * cols)

    def zeroed_floats(self, rows: int, cols: int, rank: int) -> int:
        """The part of the scratch that is added into, so must start at zero (taken
        from the reused zeroed workspace); the deterministic ``dp_part`` is stored
        whole by the kernel and comes from the reused pool that is never zeroed."""
        if self.atomic:
            return self.scratch_floats(rows, cols, rank)
        return rank * self.col_splits * rows


def bwd_plan(rows: int, cols: int, cfg: Config, atomic: bool) -> BwdPlan:
    """The launch shape: a function of the tensor shapes only, never of the GPU."""
    row_blocks, col_tiles = triton.cdiv(rows, cfg.block_r), triton.cdiv(cols, cfg.block_c)
    s_r, s_c = bwd_splits(row_blocks, col_tiles, rows, cols)
    rb_per, ct_per = triton.cdiv(row_blocks, s_r), triton.cdiv(col_tiles, s_c)
    return BwdPlan(cfg, rb_per, ct_per, triton.cdiv(row_blocks, rb_per),
                   triton.cdiv(col_tiles, ct_per), atomic)


def _accumulate(u: Tensor, p: Tensor, cols: int, splits: Tuple[int, int], run,
                dp_stored: bool = False) -> Tuple[Tensor, Tensor]:
    """``du`` (like u) and ``dp`` (r × cols, p's dtype) from ``run(du_acc, dp_acc)``, a
    launch that adds the scaled gradients into zeroed fp32 accumulators, ``splits``
    = (du, dp) copies of each, summed in a fixed order by the finish kernel.
    ``dp_stored``: the launch stores every element of ``dp_acc`` instead of adding.

    What is added into comes from the reused zeroed workspace, and the finish kernel
    sums, casts and zeroes it; a stored ``dp_acc`` comes from the reused pool that
    nobody zeroes: two launches, no memset or fill. du, dp are fresh tensors (the
    custom ops may not return two views of one buffer).
    """
    rows, rank = u.shape
    n_du, n_dp = rank * rows, rank * cols
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    dp = torch.empty((rank, cols), dtype=p.dtype, device=p.device)
    s_u, s_p = splits
    added = s_u * n_du + (0 if dp_stored else s_p * n_dp)
    with _WORKSPACE.take(added, u.device) as scratch, \
            (_STORED.take(s_p * n_dp, u.device) if dp_stored
             else nullcontext(scratch[s_u * n_du:])) as dp_acc:
        du_acc = scratch[:s_u * n_du]
        run(du_acc, dp_acc)
        du_progs = triton.cdiv(n_du, REDUCE_BLOCK)
        kernels.lie_reduce_kernel[(du_progs + triton.cdiv(n_dp, REDUCE_BLOCK),)](
            du_acc, du, n_du, s_u, du_progs, dp_acc, dp, n_dp, s_p, BLOCK=REDUCE_BLOCK,
            ZERO_DP=not dp_stored)
    return du, dp


class _Table(NamedTuple):
    """A grouped launch's device state, built once per layer set."""
    table: Tensor
    tile_layer: Tensor
    scales: Tensor
    u_buf: Tensor
    p_buf: Tensor
    tiles: int
    out_numel: int


def _unused_dw(w: WOperand, weight) -> Tensor:
    """The dW pointer of a backward without dW: never written, but its element type is
    the compute dtype of the 16-bit dot operands (``triton_kernels``), so a dense W
    itself and, for a quantized one, an empty tensor of its compute dtype."""
    if w.fmt == kernels.W_DENSE:
        return w.data
    return torch.empty((0, 0), dtype=weight.dtype, device=weight.device)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """The grouped path's only host-to-device copy (tests count its calls)."""
    return host.to(device)


class TritonBackend(Backend):
    name = "triton"
    priority = 20

    def __init__(self):
        self._tables: "OrderedDict[tuple, _Table]" = OrderedDict()

    def availability(self) -> Tuple[bool, str]:
        if _IMPORT_ERROR is not None:
            return False, f"triton is not importable ({_IMPORT_ERROR}); pip install triton"
        if _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
        if not torch.cuda.is_available():
            return False, ("no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the "
                           "Triton interpreter on CPU tensors)")
        return True, f"compiled Triton kernels on {torch.cuda.get_device_name()}"

    def auto_priority(self, weight: Tensor) -> Optional[int]:
        return self.priority if weight.is_cuda else None

    def not_supported_reasons(self, weight, u, p, order) -> list:
        reasons = []
        if weight.device.type == "cpu" and not _interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1")
        elif weight.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {weight.device.type} is not supported")
        if isinstance(weight, QuantizedWeight):
            reasons += quantized_limits(weight)
        return reasons + kernel_limits(weight, u, order, MAX_RANK, tuple(QUANTIZED_FORMATS))

    def forward(self, weight: Tensor, u: Tensor, p: Tensor,
                order: Optional[int], scale: float) -> Tensor:
        w, pm, perm = _operands(weight, p)
        out = _empty_output(weight, perm)
        o2 = rows_view(out, perm)
        rows, cols = o2.shape
        rp = rank_pad(u.shape[1])
        cfg = (_interp_config(rows, cols) if _interpreting()
               else config("fwd", _DTYPE_NAMES[weight.dtype], rp, w_format=w.name))
        row_blocks, col_tiles = triton.cdiv(rows, cfg.block_r), triton.cdiv(cols, cfg.block_c)
        kernels.lie_fwd_kernel[(row_blocks * col_tiles,)](
            *w.kernel_args(), u, pm, o2, rows, cols, u.shape[1], *w.strides, *u.stride(),
            *pm.stride(), *o2.stride(), float(scale), col_tiles, ORDER=encode_order(order),
            RP=rp, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, DOT=dot_mode(weight.dtype),
            **w.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out

    def backward(self, grad: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                 order: Optional[int], scale: float, need_dw: bool,
                 overwrite_grad: bool = False) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        if order == 0:
            return order_zero_backward(grad, weight, u, p, need_dw)
        w, pm, perm = _operands(weight, p)
        g2 = rows_in_order(grad, perm)
        rows, cols = g2.shape
        rank = u.shape[1]
        rp = rank_pad(rank)
        cfg = (_interp_config(rows, cols) if _interpreting()
               else config("bwd", _DTYPE_NAMES[weight.dtype], rp, u.dtype == torch.float32,
                           w.name))
        plan = bwd_plan(rows, cols, cfg, atomic=not deterministic())
        s_r, s_c = plan.row_splits, plan.col_splits
        dw = _empty_output(weight, perm) if need_dw else None
        d2 = rows_view(dw, perm) if need_dw else _unused_dw(w, weight)

        def run(du_acc: Tensor, dp_acc: Tensor) -> None:
            kernels.lie_bwd_kernel[(s_r * s_c,)](
                g2, *w.kernel_args(), u, pm, d2, du_acc, dp_acc, rows, cols, rank, plan.rb_per,
                plan.ct_per, s_c, *g2.stride(), *w.strides, *u.stride(), *pm.stride(),
                *d2.stride(), float(scale), ORDER=encode_order(order),
                DORDER=derivative_code(order), NEED_DW=need_dw, RP=rp,
                BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, DOT=dot_mode(weight.dtype),
                ATOMIC=plan.atomic, **w.constexprs(), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)

        du, dp = _accumulate(u, p, cols, (1, 1) if plan.atomic else (s_c, s_r), run,
                             dp_stored=not plan.atomic)
        return dw, du, columns_from_order(dp, weight.shape, perm)

    def linear_backward(self, grad_y: Tensor, x: Tensor, weight: Tensor, u: Tensor,
                        p: Tensor, order: Optional[int], scale: float, need_dw: bool
                        ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """One kernel: ``dL/dW' = grad_yᵀ x`` tile by tile on tensor cores with the Lie
        backward as its epilogue, so dL/dW' (W-sized) is never written nor read back
        (a quantized W: deq(W) is rebuilt from its stored bytes in that epilogue).
        Taken for a 16-bit W with ``grad_y`` and ``x`` in W's dtype (fp32 accumulation,
        so dL/dW' is not rounded to 16 bits as a separate GEMM would); otherwise, under
        ``torch.use_deterministic_algorithms(True)`` (its du/dp are atomic sums) and
        for order 0, the default: form dL/dW', then ``backward``."""
        if (order == 0 or deterministic() or weight.dtype == torch.float32
                or grad_y.dtype != weight.dtype or x.dtype != weight.dtype):
            return super().linear_backward(grad_y, x, weight, u, p, order, scale, need_dw)
        (n, rows), cols, rank = grad_y.shape, x.shape[1], u.shape[1]
        rp = rank_pad(rank)
        w = w_operand(weight)
        cfg = (_interp_linear_config(rows, cols, n) if _interpreting()
               else config("linear", _DTYPE_NAMES[weight.dtype], rp, u.dtype == torch.float32,
                           w.name))
        col_tiles = triton.cdiv(cols, cfg.block_c)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) \
            if need_dw else None
        d2 = _unused_dw(w, weight) if dw is None else dw

        def run(du_acc: Tensor, dp_acc: Tensor) -> None:
            kernels.lie_linear_bwd_kernel[(triton.cdiv(rows, cfg.block_r) * col_tiles,)](
                grad_y, x, *w.kernel_args(), u, p, d2, du_acc, dp_acc, n, rows, cols, rank,
                *grad_y.stride(), *x.stride(), *w.strides, *u.stride(), *p.stride(),
                *d2.stride(), float(scale), col_tiles, ORDER=encode_order(order),
                DORDER=derivative_code(order), NEED_DW=need_dw, RP=rp,
                BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n,
                GROUP_R=LINEAR_GROUP, DOT=dot_mode(weight.dtype), **w.constexprs(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        du, dp = _accumulate(u, p, cols, (1, 1), run)
        return dw, du, dp

    def forward_many(self, weights, us, ps, order, scales):
        """All dense layers of one dtype in one launch of the grouped kernel; a quantized
        W on its own (the grouped kernel reads dense W only)."""
        outs = [None] * len(weights)
        groups = {}
        for i, w in enumerate(weights):
            if isinstance(w, QuantizedWeight):
                outs[i] = self.forward(w, us[i], ps[i], order, scales[i])
            else:
                groups.setdefault(w.dtype, []).append(i)
        for idx in groups.values():
            for i, out in zip(idx, self._grouped([weights[i] for i in idx],
                                                 [us[i] for i in idx], [ps[i] for i in idx],
                                                 order, [scales[i] for i in idx])):
                outs[i] = out
        return outs

    def _table(self, w2s, us, ps, scales, cfg, up_dtype) -> _Table:
        """The launch table for these layers: cached on the device, keyed by what it
        holds (W pointers, shapes, strides, scales), so later calls copy nothing to it."""
        key = (cfg, up_dtype, tuple(scales), w2s[0].device,
               tuple((w.data_ptr(), tuple(w.shape), w.stride(), tuple(u.shape))
                     for w, u in zip(w2s, us)))
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        dev = w2s[0].device
        u_buf = torch.empty(sum(u.numel() for u in us), dtype=up_dtype, device=dev)
        p_buf = torch.empty(sum(p.numel() for p in ps), dtype=up_dtype, device=dev)
        table, counts, tiles, out_off, u_off, p_off = [], [], 0, 0, 0, 0
        for w2, u, p in zip(w2s, us, ps):
            rows, cols = w2.shape
            rank = u.shape[1]
            col_tiles = triton.cdiv(cols, cfg.block_c)
            n = triton.cdiv(rows, cfg.block_r) * col_tiles
            s_wr, s_wc = w2.stride()
            entry = dict(w=w2.data_ptr(), u=u_buf.data_ptr() + u_off * u_buf.element_size(),
                         p=p_buf.data_ptr() + p_off * p_buf.element_size(), out=out_off,
                         R=rows, M=cols, r=rank, s_wr=s_wr, s_wc=s_wc, s_ur=rank, s_uk=1,
                         s_pk=cols, s_pc=1, col_tiles=col_tiles, first_tile=tiles)
            table.append([entry[c] for c in kernels.TABLE_COLS])
            counts.append(n)
            tiles, out_off = tiles + n, out_off + w2.numel()
            u_off, p_off = u_off + u.numel(), p_off + p.numel()
        layer_of_tile = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                                torch.tensor(counts))
        entry = _Table(_to_device(torch.tensor(table, dtype=torch.int64), dev),
                       _to_device(layer_of_tile, dev),
                       _to_device(torch.tensor(scales, dtype=torch.float32), dev),
                       u_buf, p_buf, tiles, out_off)
        self._tables[key] = entry
        if len(self._tables) > 16:
            self._tables.popitem(last=False)
        return entry

    def _grouped(self, weights, us, ps, order, scales):
        views = [weight_rows(w, p) for w, p in zip(weights, ps)]
        w2s = [v[0] for v in views]
        rp = rank_pad(max(u.shape[1] for u in us))
        cfg = (_interp_config(max(w.shape[0] for w in w2s), max(w.shape[1] for w in w2s))
               if _interpreting() else config("grouped", _DTYPE_NAMES[weights[0].dtype], rp))
        up_dtype = (torch.float32 if any(t.dtype == torch.float32 for t in (*us, *ps))
                    else weights[0].dtype)
        tab = self._table(w2s, us, ps, scales, cfg, up_dtype)
        # this call's factors into the table's buffers: device-to-device, no sync
        tab.u_buf.copy_(torch.cat([u.reshape(-1).to(up_dtype) for u in us]))
        tab.p_buf.copy_(torch.cat([v[1].reshape(-1).to(up_dtype) for v in views]))
        flat = torch.empty(tab.out_numel, dtype=weights[0].dtype, device=weights[0].device)
        kernels.lie_fwd_grouped_kernel[(tab.tiles,)](
            tab.table, tab.tile_layer, tab.scales, flat,
            DTYPE=_TL_DTYPES[weights[0].dtype], UP_DTYPE=_TL_DTYPES[up_dtype],
            ORDER=encode_order(order), RP=rp, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c,
            DOT=dot_mode(weights[0].dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        outs, off = [], 0
        for w, (w2, _, perm) in zip(weights, views):
            outs.append(rows_to_weight(flat[off:off + w2.numel()].view(w2.shape), w.shape, perm))
            off += w2.numel()
        return outs


BACKEND = TritonBackend()
