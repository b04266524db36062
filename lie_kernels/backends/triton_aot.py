"""Compile the Triton kernels for real GPU targets without a GPU, as the JIT would.

Each case is compiled with the specialisation the runtime JIT gives contiguous,
16-byte-aligned tensors (DESIGN.md §5): unit strides are constexpr 1, pointers
and sizes divisible by 16 carry ``tt.divisibility``; tile shapes, warps and
stages come from the backend's own ``fwd_config``/``bwd_config``. The
interpreter accepts code that a GPU compiler rejects (``tl.dot`` with K < 16,
bf16 quirks), and the SASS shows what the interpreter cannot (spills, vector
width, tensor cores): ``lie_kernels.kernel_report`` and
``tests/test_kernel_health.py`` read it.

Coverage ("every configuration the backend can launch"), for fp32/fp16/bf16 W:
on sm_90 every order at rank pad 16 and every rank pad (16..128) at the
heaviest orders (8: the longest Horner chain; exact: ``exp``), plus dW, the
grouped kernel and fp32 factors with a 16-bit W at the smallest and largest
rank pad; on sm_80 the corners (orders 8/exact at rank pads 16 and 128). Every
backward, and its finish kernel, in both reductions; the fused Linear backward
(16-bit W, atomics only) at order 1 and at the heavy orders over every rank pad.
Between those points only the length of an unrolled Horner chain or the tile
shape changes, so the corners bound the rest; compiling all ~400 combinations
would take about 15 minutes on 2 cores, the gate about 4. ``python -m lie_kernels.backends.triton_aot 80 90`` compiles
them all, two at a time, and prints one line per kernel.
"""
from __future__ import annotations

import itertools
import multiprocessing
import sys
from typing import Iterator, NamedTuple

from .triton_kernels import (DOT_16, DOT_IEEE, EXACT, lie_bwd_kernel, lie_fwd_grouped_kernel,
                             lie_fwd_kernel, lie_linear_bwd_kernel, lie_reduce_kernel)

ORDERS = [EXACT, *range(0, 9)]
HEAVY_ORDERS = (8, EXACT)
RANK_PADS = (16, 32, 64, 128)
DTYPES = ("fp32", "fp16", "bf16")


class Case(NamedTuple):
    kernel: str          # "fwd" | "bwd" | "linear" | "grouped" | "reduce"
    dtype: str           # W's dtype
    order: int
    rank_pad: int
    factors: str = ""    # factor dtype when it differs from W's ("fp32")
    need_dw: bool = False
    atomic: bool = False  # backward: atomic accumulators instead of split partials

    def describe(self) -> str:
        extra = (f" factors={self.factors}" if self.factors else "") + \
            (" need_dw" if self.need_dw else "") + (" atomic" if self.atomic else "")
        return (f"{self.kernel} {self.dtype} order={order_name(self.order)} "
                f"rank_pad={self.rank_pad}{extra}")


def order_name(order: int) -> str:
    return "exact" if order == EXACT else str(order)


def cases(arch: int = 90) -> Iterator[Case]:
    """Everything the gate compiles for ``arch`` (coverage: module docstring); every
    backward in both reductions (split partials and atomics)."""
    for case in _cases(arch):
        yield case
        if case.kernel in ("bwd", "reduce"):  # reduce: atomic = zeroes dp_part too
            yield case._replace(atomic=True)


def _cases(arch: int) -> Iterator[Case]:
    for dtype in DTYPES:
        if arch != 90:  # sm_80: the corners only (smallest/largest rank pad, heavy orders)
            for order, rp in itertools.product(HEAVY_ORDERS, (16, 128)):
                yield from (Case("fwd", dtype, order, rp), Case("bwd", dtype, order, rp))
                if dtype != "fp32":
                    yield Case("linear", dtype, order, rp)
            yield Case("reduce", dtype, 0, 0)
            continue
        for order in ORDERS:
            yield Case("fwd", dtype, order, 16)
            if order != 0:  # order 0 has no backward kernel: its gradients are zero
                yield Case("bwd", dtype, order, 16)
        for rp in RANK_PADS[1:]:
            yield Case("fwd", dtype, 8, rp)
            yield from (Case("bwd", dtype, order, rp) for order in HEAVY_ORDERS)
        for rp in (16, 128):
            yield Case("bwd", dtype, 8, rp, need_dw=True)
            yield Case("grouped", dtype, 8, rp)
            if dtype != "fp32":
                yield from (Case("fwd", dtype, 8, rp, "fp32"), Case("bwd", dtype, 8, rp, "fp32"))
        if dtype != "fp32":  # the fused Linear backward (16-bit W only)
            yield Case("linear", dtype, 1, 16)
            for rp in RANK_PADS:
                yield from (Case("linear", dtype, order, rp) for order in HEAVY_ORDERS)
            for rp in (16, 128):
                yield from (Case("linear", dtype, 8, rp, need_dw=True),
                            Case("linear", dtype, 8, rp, "fp32"))
        yield Case("reduce", dtype, 0, 0)


def _tl(name: str):
    import triton.language as tl
    return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[name]


def _source(case: Case):
    """ASTSource with the JIT's specialisation for contiguous, aligned tensors, and
    the launch options the backend uses."""
    from triton.compiler import ASTSource
    from .triton_backend import (LINEAR_GROUP, bwd_config, fwd_config, grouped_config,
                                 linear_bwd_config)
    d, f = "*" + case.dtype, "*" + (case.factors or case.dtype)
    dot = DOT_IEEE if case.dtype == "fp32" else DOT_16
    if case.kernel == "fwd":
        cfg = fwd_config(case.rank_pad, case.dtype)
        fn = lie_fwd_kernel
        sig = dict(w_ptr=d, u_ptr=f, p_ptr=f, out_ptr=d, R="i32", M="i32", r="i32",
                   s_wr="i32", s_ur="i32", s_pk="i32", s_or="i32", scale="fp32",
                   col_tiles="i32")
        const = dict(s_wc=1, s_uk=1, s_pc=1, s_oc=1, ORDER=case.order, RP=case.rank_pad,
                     BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, DOT=dot)
        div = ("w_ptr", "u_ptr", "p_ptr", "out_ptr", "M", "s_wr", "s_pk", "s_or")
    elif case.kernel == "bwd":
        cfg = bwd_config(case.rank_pad, case.dtype, case.factors == "fp32")
        fn = lie_bwd_kernel
        sig = dict(g_ptr=d, w_ptr=d, u_ptr=f, p_ptr=f, dw_ptr=d, du_part_ptr="*fp32",
                   dp_part_ptr="*fp32", R="i32", M="i32", r="i32",
                   row_blocks_per_split="i32", col_tiles_per_split="i32", col_splits="i32",
                   s_gr="i32", s_wr="i32", s_ur="i32", s_pk="i32", s_dr="i32", scale="fp32")
        const = dict(s_gc=1, s_wc=1, s_uk=1, s_pc=1, s_dc=1, ORDER=case.order,
                     DORDER=EXACT if case.order == EXACT else case.order - 1,
                     NEED_DW=case.need_dw, RP=case.rank_pad, BLOCK_R=cfg.block_r,
                     BLOCK_C=cfg.block_c, DOT=dot, ATOMIC=case.atomic)
        div = ("g_ptr", "w_ptr", "u_ptr", "p_ptr", "dw_ptr", "du_part_ptr", "dp_part_ptr",
               "M", "s_gr", "s_wr", "s_pk", "s_dr")
    elif case.kernel == "linear":
        cfg = linear_bwd_config(case.rank_pad, case.factors == "fp32")
        fn = lie_linear_bwd_kernel
        sig = dict(gy_ptr=d, x_ptr=d, w_ptr=d, u_ptr=f, p_ptr=f, dw_ptr=d, du_ptr="*fp32",
                   dp_ptr="*fp32", N="i32", R="i32", M="i32", r="i32", s_gn="i32",
                   s_xn="i32", s_wr="i32", s_ur="i32", s_pk="i32", s_dr="i32", scale="fp32",
                   col_tiles="i32")
        const = dict(s_gr=1, s_xc=1, s_wc=1, s_uk=1, s_pc=1, s_dc=1, ORDER=case.order,
                     DORDER=EXACT if case.order == EXACT else case.order - 1,
                     NEED_DW=case.need_dw, RP=case.rank_pad, BLOCK_R=cfg.block_r,
                     BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, GROUP_R=LINEAR_GROUP, DOT=dot)
        div = ("gy_ptr", "x_ptr", "w_ptr", "u_ptr", "p_ptr", "dw_ptr", "du_ptr", "dp_ptr",
               "R", "M", "s_gn", "s_xn", "s_wr", "s_pk", "s_dr")
    elif case.kernel == "grouped":
        cfg = grouped_config(case.rank_pad, case.dtype)
        fn = lie_fwd_grouped_kernel
        sig = dict(table_ptr="*i64", tile_layer_ptr="*i32", scale_ptr="*fp32", out_ptr=d)
        const = dict(DTYPE=_tl(case.dtype), UP_DTYPE=_tl(case.factors or case.dtype),
                     ORDER=case.order, RP=case.rank_pad, BLOCK_R=cfg.block_r,
                     BLOCK_C=cfg.block_c, DOT=dot)
        div = ("table_ptr", "tile_layer_ptr", "scale_ptr", "out_ptr")
    else:
        cfg = None
        fn = lie_reduce_kernel
        sig = dict(du_part_ptr="*fp32", du_ptr=d, n_du="i32", du_splits="i32",
                   du_progs="i32", dp_part_ptr="*fp32", dp_ptr=d, n_dp="i32",
                   dp_splits="i32")
        const = dict(BLOCK=1024, ZERO_DP=case.atomic)
        div = ("du_part_ptr", "du_ptr", "dp_part_ptr", "dp_ptr", "n_du", "n_dp")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in const}}, const, attrs)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else \
        dict(num_warps=4)
    return src, options


def contract(case: Case) -> str:
    """What the SASS of a case must show: 128-bit loads/stores where W/g/W' rows
    are contiguous and aligned, MMA where a 16-bit rank contraction runs, and
    hardware atomic reductions (not compare-and-swap loops) in an atomic backward."""
    mma = case.dtype != "fp32" and case.order != 0 and case.kernel != "reduce"
    if case.kernel == "fwd":
        vec = "ldg128 stg128"
    elif case.kernel == "linear":
        vec = ("ldg128 stg128" if case.need_dw and case.rank_pad < 128 else "ldg128") + " red"
    elif case.kernel == "bwd":
        # dW at rank pad 128: the tile that fits (no spill, 2 blocks/SM) gives each thread
        # 2-4 contiguous elements, a 64-bit store; stated as a known limit in docs/
        vec = ("ldg128 stg128" if case.need_dw and case.rank_pad < 128 else "ldg128") + \
            (" red" if case.atomic else "")
    else:  # grouped: pointers come from a table, alignment unknown; reduce: fp32 sums
        vec = ""
    return (vec + (" mma" if mma else "")).strip()


def compile_case(case: Case, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    src, options = _source(case)
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options), options


def _row(job) -> dict:
    from .. import kernel_report
    arch, case = job
    kernel, options = compile_case(case, arch)
    return kernel_report.cubin_row(
        kernel.asm["cubin"], kernel=f"triton {case.kernel}" + (" atomic" if case.atomic else "")
        + (" dW" if case.need_dw else "") + (" f32-factors" if case.factors else ""),
        arch=arch, dtype=case.dtype, order=order_name(case.order), rank_pad=case.rank_pad,
        num_warps=options["num_warps"], contract=contract(case),
        launch_smem=kernel.metadata.shared)


def report_rows(archs, workers: int = 2):
    """Compile every case for every arch in ``workers`` processes; yields report rows
    (in case order); raises on a compile failure."""
    jobs = [(a, c) for a in archs for c in cases(a)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_row, jobs)


if __name__ == "__main__":
    for row in report_rows([int(a) for a in sys.argv[1:]] or [80, 90]):
        print(f"compiled sm_{row['arch']} {row['kernel']} {row['dtype']} order={row['order']} "
              f"rank_pad={row['rank_pad']}", flush=True)
