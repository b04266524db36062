"""Triton backend: the fused kernels of ``triton_kernels.py`` behind the Backend contract.

On CUDA tensors the kernels are compiled for the GPU. With ``TRITON_INTERPRET=1``
they run in Triton's interpreter on CPU tensors, which is how they are tested on
machines without a GPU (slow: ``auto`` never picks it there).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, kernel_limits, order_zero_backward, unfold

try:
    import triton
    import triton.language as tl
    from . import triton_kernels as K
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                  torch.bfloat16: tl.bfloat16}
    _IMPORT_ERROR = None
except ImportError as exc:  # triton is optional
    _IMPORT_ERROR = exc

MAX_RANK = 128  # the whole padded rank lives in one register tile
MAX_ORDER = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _order_const(order: Optional[int]) -> int:
    return K.EXACT if order is None else order


def _blocks(rows: int, cols: int, rank_pad: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): one program per small problem in the interpreter
    (~4 ms per program there); 64x128 tiles with 16-byte column vectors on a GPU."""
    if _interpreting():
        return (min(64, triton.next_power_of_2(rows)), min(256, triton.next_power_of_2(cols)),
                4)
    block_r = 64 if rank_pad <= 32 else 32
    return block_r, 128, 8 if rank_pad <= 32 else 4


class TritonBackend(Backend):
    name = "triton"
    priority = 20

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
        return reasons + kernel_limits(weight, u, order, MAX_ORDER, MAX_RANK)

    def forward(self, weight: Tensor, u: Tensor, p: Tensor,
                order: Optional[int], scale: float) -> Tensor:
        w2 = unfold(weight)
        rows, cols = w2.shape
        out = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device)
        rp = max(16, triton.next_power_of_2(u.shape[1]))
        br, bc, warps = _blocks(rows, cols, rp)
        grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
        K.lie_fwd_kernel[grid](
            w2, u, p, out, rows, cols, u.shape[1], *w2.stride(), *u.stride(), *p.stride(),
            float(scale), ORDER=_order_const(order), RP=rp, BLOCK_R=br, BLOCK_C=bc,
            # bf16/fp16 tl.dot is wrong in the interpreter; fp32 needs IEEE, not tf32
            DOT_FP32=_interpreting() or weight.dtype == torch.float32, num_warps=warps)
        return out.view(weight.shape)

    def backward(self, grad: Tensor, weight: Tensor, u: Tensor, p: Tensor,
                 order: Optional[int], scale: float, need_dw: bool
                 ) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        if order == 0:
            return order_zero_backward(grad, weight, u, p, need_dw)
        w2, g2 = unfold(weight), unfold(grad)
        rows, cols = w2.shape
        rank = u.shape[1]
        rp = max(16, triton.next_power_of_2(rank))
        br, bc, warps = _blocks(rows, cols, rp)
        row_blocks, col_tiles = triton.cdiv(rows, br), triton.cdiv(cols, bc)
        splits = self._column_splits(row_blocks, col_tiles, weight.device)
        tiles_per_split = triton.cdiv(col_tiles, splits)
        splits = triton.cdiv(col_tiles, tiles_per_split)
        f32 = dict(dtype=torch.float32, device=weight.device)
        du_part = torch.empty((splits, rows, rank), **f32)
        dp_part = torch.empty((row_blocks, rank, cols), **f32)
        dw = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device) if need_dw \
            else du_part  # placeholder pointer, never written when NEED_DW is False
        K.lie_bwd_kernel[(row_blocks, splits)](
            g2, w2, u, p, dw, du_part, dp_part, rows, cols, rank, tiles_per_split,
            *g2.stride(), *w2.stride(), *u.stride(), *p.stride(), float(scale),
            ORDER=_order_const(order), DORDER=K.EXACT if order is None else order - 1,
            NEED_DW=need_dw, RP=rp, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
        # fixed-order sums of the partials: deterministic, no atomics
        du, dp = du_part.sum(0).to(u.dtype), dp_part.sum(0).to(p.dtype)
        return (dw.view(weight.shape) if need_dw else None), du, dp

    def forward_many(self, weights, us, ps, order, scales):
        """All layers of one dtype in one launch of the grouped kernel."""
        outs = [None] * len(weights)
        groups = {}
        for i, w in enumerate(weights):
            groups.setdefault(w.dtype, []).append(i)
        for dtype, idx in groups.items():
            for i, out in zip(idx, self._grouped([weights[i] for i in idx],
                                                 [us[i] for i in idx], [ps[i] for i in idx],
                                                 order, [scales[i] for i in idx])):
                outs[i] = out
        return outs

    def _grouped(self, weights, us, ps, order, scales):
        w2s = [unfold(w) for w in weights]
        outs = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
        rp = max(16, triton.next_power_of_2(max(u.shape[1] for u in us)))
        br, bc, warps = _blocks(max(w.shape[0] for w in w2s), max(w.shape[1] for w in w2s), rp)
        table, tiles = [], []
        for w2, u, p, out in zip(w2s, us, ps, outs):
            rows, cols = w2.shape
            col_tiles = triton.cdiv(cols, bc)
            table.append([w2.data_ptr(), u.data_ptr(), p.data_ptr(), out.data_ptr(), rows,
                          cols, u.shape[1], *w2.stride(), *u.stride(), *p.stride(),
                          col_tiles])
            tiles.append(triton.cdiv(rows, br) * col_tiles)
        dev = weights[0].device
        counts = torch.tensor(tiles)
        tile_layer = torch.repeat_interleave(torch.arange(len(tiles), dtype=torch.int32),
                                             counts).to(dev)
        tile_first = (torch.cumsum(counts, 0) - counts).to(torch.int32).to(dev)
        K.lie_fwd_grouped_kernel[(int(counts.sum()),)](
            torch.tensor(table, dtype=torch.int64).to(dev), tile_layer, tile_first,
            torch.tensor(scales, dtype=torch.float32).to(dev),
            DTYPE=_TL_DTYPES[weights[0].dtype], ORDER=_order_const(order), RP=rp,
            BLOCK_R=br, BLOCK_C=bc,
            DOT_FP32=_interpreting() or weights[0].dtype == torch.float32, num_warps=warps)
        return outs

    @staticmethod
    def _column_splits(row_blocks: int, col_tiles: int, device: torch.device) -> int:
        """Split the columns so that about 4 programs per SM are in flight on a GPU."""
        if device.type != "cuda":
            return 1
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(col_tiles, triton.cdiv(target, row_blocks)))


BACKEND = TritonBackend()
