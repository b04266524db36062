"""Compile the Triton kernels for real GPU targets without a GPU.

The interpreter accepts code that a GPU compiler rejects (``tl.dot`` with an
inner dimension below 16, bf16 quirks, missing libdevice calls), so the tests
run this in a process without ``TRITON_INTERPRET`` for every order and dtype we
ship. ``python -m lie_kernels.backends.triton_aot 80 90`` compiles them all, two
at a time, and prints one line per kernel.
"""
from __future__ import annotations

import itertools
import multiprocessing
import sys

import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

from .triton_kernels import (EXACT, TABLE_COLS, lie_bwd_kernel, lie_fwd_grouped_kernel,
                             lie_fwd_kernel)

ORDERS = [EXACT, *range(0, 9)]
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_TL = {"*fp32": tl.float32, "*fp16": tl.float16, "*bf16": tl.bfloat16}
# Every order and dtype with the smallest rank tile; the largest tile (rank 65..128)
# changes only the tile shape, so one order per dtype covers it.
BIG_RANK_PAD, BIG_RANK_ORDERS = 128, (4,)


def _fwd_source(dtype: str, order: int, rp: int) -> ASTSource:
    sig = dict(w_ptr=dtype, u_ptr=dtype, p_ptr=dtype, out_ptr=dtype, R="i32", M="i32",
               r="i32", s_wr="i32", s_wc="i32", s_ur="i32", s_uk="i32", s_pk="i32",
               s_pc="i32", scale="fp32")
    const = dict(ORDER=order, RP=rp, BLOCK_R=64 if rp <= 32 else 32, BLOCK_C=128,
                 DOT_FP32=dtype == "*fp32")
    return ASTSource(lie_fwd_kernel, {**sig, **{k: "constexpr" for k in const}}, const)


def _bwd_source(dtype: str, order: int, rp: int) -> ASTSource:
    sig = dict(g_ptr=dtype, w_ptr=dtype, u_ptr=dtype, p_ptr=dtype, dw_ptr=dtype,
               du_part_ptr="*fp32", dp_part_ptr="*fp32", R="i32", M="i32", r="i32",
               tiles_per_split="i32", s_gr="i32", s_gc="i32", s_wr="i32", s_wc="i32",
               s_ur="i32", s_uk="i32", s_pk="i32", s_pc="i32", scale="fp32")
    const = dict(ORDER=order, DORDER=EXACT if order == EXACT else order - 1,
                 NEED_DW=True, RP=rp, BLOCK_R=64 if rp <= 32 else 32, BLOCK_C=128)
    return ASTSource(lie_bwd_kernel, {**sig, **{k: "constexpr" for k in const}}, const)


def _grouped_source(dtype: str, order: int, rp: int) -> ASTSource:
    sig = dict(table_ptr="*i64", tile_layer_ptr="*i32", tile_first_ptr="*i32",
               scale_ptr="*fp32")
    const = dict(DTYPE=_TL[dtype], ORDER=order, RP=rp, BLOCK_R=64, BLOCK_C=128,
                 DOT_FP32=dtype == "*fp32")
    assert len(TABLE_COLS) == 14  # the kernel reads a 14-column table row
    return ASTSource(lie_fwd_grouped_kernel, {**sig, **{k: "constexpr" for k in const}}, const)


def cases():
    """(description, ASTSource factory, args) for everything we ship."""
    for dtype, order in itertools.product(DTYPES, ORDERS):
        for rp in (16, BIG_RANK_PAD) if order in BIG_RANK_ORDERS else (16,):
            yield f"fwd {dtype} order={order} rank_pad={rp}", _fwd_source, (DTYPES[dtype], order, rp)
            if rp == 16:
                yield f"grouped fwd {dtype} order={order}", _grouped_source, (DTYPES[dtype], order, rp)
            if order != 0:  # order 0 has no backward kernel: its gradients are zero
                yield f"bwd {dtype} order={order} rank_pad={rp}", _bwd_source, (DTYPES[dtype], order, rp)


def _compile_one(job) -> str:
    arch, desc, make, args = job
    triton_compile(make(*args), target=GPUTarget("cuda", arch, 32))
    return f"sm_{arch} {desc}"


def compile_all(archs, workers: int = 2):
    """Compile every case for every arch; yields a line per kernel, raises on a failure."""
    jobs = [(a, d, m, args) for a in archs for d, m, args in cases()]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_compile_one, jobs)


if __name__ == "__main__":
    for line in compile_all([int(a) for a in sys.argv[1:]] or [80, 90]):
        print("compiled", line, flush=True)
