"""Compile the Triton kernels for real GPU targets without a GPU, as the JIT would.

Each case is compiled with the specialisation the runtime JIT gives contiguous,
16-byte-aligned tensors: unit strides are constexpr 1, pointers
and sizes divisible by 16 carry ``tt.divisibility``; tile shapes, warps and
stages come from the backend's own table (``lie_kernels/backends/triton_configs.py``), and
each signature is derived from the kernel's parameter list (``signature``). The
interpreter accepts code that a GPU compiler rejects (``tl.dot`` with K < 16,
bf16 quirks), and the SASS shows what the interpreter cannot (spills, vector
width, tensor cores): ``dev/kernel_report.py`` and
``tests/test_kernel_health.py`` read it.

Coverage ("every configuration the backend can launch"), for fp32/fp16/bf16 W:
on sm_90 every order at rank pad 16 and every rank pad (16..128) at the
heaviest orders (8: the longest Horner chain; exact: ``exp``), plus dW, the
grouped kernel and fp32 factors with a 16-bit W at the smallest and largest
rank pad; on sm_80 the corners (orders 8/exact at rank pads 16 and 128). Every
backward, and its finish kernel, in both reductions; the fused Linear backward
(16-bit W, atomics only) at order 1 and at the heavy orders over every rank pad.
A quantized W (nf4 standing for fp4: the same kernel; int8; fp8, sm_90 only: the backend
refuses it below sm_89) over compute dtypes fp32/fp16/bf16, forward, backward (both
reductions) and the fused Linear backward (16-bit): the corners (heavy orders at rank pads
16 and 128); on sm_90 for nf4 and int8 also order 1, order 8 at rank pads 32 and 64, and
fp32 factors at order 8. Their rows also check, in the LLVM IR, that every load of W's
stored bytes is as wide as the tile allows (``ldg_w``: 128 bits wherever a thread's share
of a tile row is 16 bytes or more; ``w_load_bits``).
Between those points only the length of an unrolled Horner chain or the tile
shape changes, so the corners bound the rest; compiling all ~400 dense combinations
would take about 15 minutes on 2 cores, the gate (dense and quantized, ~550 Triton
configurations) about 8. ``python -m dev.triton_aot 80 90``
compiles them all, two at a time, and prints one line per kernel.
"""
from __future__ import annotations

import inspect
import itertools
import multiprocessing
import re
import sys
from typing import Iterator, NamedTuple

import triton.language as tl

from lie_kernels.backends.triton_backend import LINEAR_GROUP
from lie_kernels.backends.triton_configs import QUANTIZED_FORMATS, RANK_PADS, config
from lie_kernels.backends.triton_kernels import (DOT_16, DOT_IEEE, W_4BIT, W_DENSE, W_FP8,
                                                 W_INT8, lie_bwd_kernel,
                                                 lie_fwd_grouped_kernel, lie_fwd_kernel,
                                                 lie_linear_bwd_kernel, lie_reduce_kernel)
from lie_kernels.backends.base import KERNEL_MAX_ORDER
from lie_kernels.order import EXACT, decode_order, derivative_code

ORDERS = [EXACT, *range(0, KERNEL_MAX_ORDER + 1)]
HEAVY_ORDERS = (KERNEL_MAX_ORDER, EXACT)
DTYPES = ("fp32", "fp16", "bf16")
#: a quantized kind -> (W_FMT, the stored element type, QBLOCK: bitsandbytes' default
#: 4-bit blocksize)
QUANTIZED = {"nf4": (W_4BIT, "u8", 64), "int8": (W_INT8, "i8", 0), "fp8": (W_FP8, "fp8e4nv", 0)}


class Case(NamedTuple):
    kernel: str          # "fwd" | "bwd" | "linear" | "grouped" | "reduce"
    dtype: str           # W's dtype
    order: int
    rank_pad: int
    factors: str = ""    # factor dtype when it differs from W's ("fp32")
    need_dw: bool = False
    atomic: bool = False  # backward: atomic accumulators instead of split partials
    quantized: str = ""   # W's quantized kind (``QUANTIZED``); dtype is then its compute dtype

    def describe(self) -> str:
        extra = (f" factors={self.factors}" if self.factors else "") + \
            (" need_dw" if self.need_dw else "") + (" atomic" if self.atomic else "") + \
            (f" W={self.quantized}" if self.quantized else "")
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
    yield from _quantized_cases(arch)


def _quantized_cases(arch: int) -> Iterator[Case]:
    for kind, dtype in itertools.product(QUANTIZED, DTYPES):
        if arch != 90 and kind == "fp8":  # the backend refuses fp8 below sm_89
            continue
        points = list(itertools.product(HEAVY_ORDERS, (16, 128)))
        if arch == 90 and kind != "fp8":  # fp8: int8's kernel but for the conversion
            points += [(1, 16), (8, 32), (8, 64)]
        for order, rp in points:
            yield Case("fwd", dtype, order, rp, quantized=kind)
            yield Case("bwd", dtype, order, rp, quantized=kind)
            if dtype != "fp32":  # the fused Linear backward: 16-bit W only
                yield Case("linear", dtype, order, rp, quantized=kind)
        if arch == 90 and kind != "fp8" and dtype != "fp32":
            for rp in (16, 128):
                yield from (Case("bwd", dtype, 8, rp, "fp32", quantized=kind),
                            Case("linear", dtype, 8, rp, "fp32", quantized=kind))


def _tl(name: str):
    import triton.language as tl
    return {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[name]


#: What cannot be read off a kernel's parameter list: the size and row-stride arguments that
#: are multiples of 16 in the problem the gate specialises for (M, the column count, and
#: everything derived from it; R only for the fused Linear backward).
DIVISIBLE = {
    "fwd": ("M", "s_wr", "s_pk", "s_or"),
    "bwd": ("M", "s_gr", "s_wr", "s_pk", "s_dr"),
    "linear": ("R", "M", "s_gn", "s_xn", "s_wr", "s_pk", "s_dr"),
    "grouped": (),
    "reduce": ("n_du", "n_dp"),
}


def _pointer_type(name: str, w: str, factors: str, stored: str = "") -> str:
    """A pointer's element type, from the kernels' naming: fp32 scratch (``*_part``,
    ``*_acc``, ``scale``), the grouped launch's tables, the factors and their gradients
    (``u``, ``p``, ``du``, ``dp``), a quantized W's bytes (``w``: ``stored``) and its fp32
    dequantization tables (``code``, ``wscale``; a dense W's launch passes W itself
    there); everything else (W, g, W', dW, x) has W's (compute) dtype."""
    stem = name[:-len("_ptr")]
    if stem.endswith(("_part", "_acc")) or stem == "scale":
        return "*fp32"
    if stem in ("table", "tile_layer"):
        return "*i64" if stem == "table" else "*i32"
    if stored and stem in ("w", "code", "wscale"):
        return "*" + (stored if stem == "w" else "fp32")
    return "*" + (factors if stem in ("u", "p", "du", "dp") else w)


def unit_strides(fn) -> tuple:
    """The inner stride of every 2-D operand: strides are named ``s_<tensor><dim>`` and
    passed per tensor as (row, column); the column stride of a contiguous tensor is 1,
    which the JIT specialises as the constant 1."""
    strides = [n for n in fn.arg_names if n.startswith("s_")]
    return tuple(n for i, n in enumerate(strides)
                 if i + 1 == len(strides) or strides[i + 1][2] != n[2])


def signature(fn, w: str, factors: str, const: dict, stored: str = "") -> dict:
    """The compile signature of ``fn`` derived from its own parameter list: constexprs as
    given (unit strides added), pointers by role (``stored``: a quantized W's element
    type), ``scale`` fp32, every other int i32."""
    sig = {}
    params = inspect.signature(fn.fn).parameters
    for n in fn.arg_names:
        if params[n].annotation in (tl.constexpr, "tl.constexpr") or n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = _pointer_type(n, w, factors, stored)
        else:
            sig[n] = "fp32" if n == "scale" else "i32"
    return sig


def _launch(case: Case):
    """``(kernel, constexprs, Config or None)`` of a case: the tiles from the backend's
    own table (``triton_configs``)."""
    dot = DOT_IEEE if case.dtype == "fp32" else DOT_16
    fp32_factors = case.factors == "fp32"
    fmt, _, qblock = QUANTIZED.get(case.quantized, (W_DENSE, "", 0))
    w_format = QUANTIZED_FORMATS.get(case.quantized, "dense")
    heavy = dict(ORDER=case.order, RP=case.rank_pad, DOT=dot)
    if case.kernel == "reduce":
        return lie_reduce_kernel, dict(BLOCK=1024, ZERO_DP=case.atomic), None
    cfg = config(case.kernel, case.dtype, case.rank_pad, fp32_factors, w_format)
    tiles = dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, W_FMT=fmt, QBLOCK=qblock)
    grad = dict(DORDER=derivative_code(decode_order(case.order)), NEED_DW=case.need_dw)
    if case.kernel == "fwd":
        return lie_fwd_kernel, {**heavy, **tiles}, cfg
    if case.kernel == "bwd":
        return lie_bwd_kernel, {**heavy, **grad, **tiles, "ATOMIC": case.atomic}, cfg
    if case.kernel == "linear":
        return lie_linear_bwd_kernel, {**heavy, **grad, **tiles, "BLOCK_N": cfg.block_n,
                                       "GROUP_R": LINEAR_GROUP}, cfg
    return lie_fwd_grouped_kernel, {**heavy, "BLOCK_R": cfg.block_r, "BLOCK_C": cfg.block_c,
                                    "DTYPE": _tl(case.dtype),
                                    "UP_DTYPE": _tl(case.factors or case.dtype)}, cfg


def _source(case: Case):
    """ASTSource with the JIT's specialisation for contiguous, aligned tensors, and
    the launch options the backend uses."""
    from triton.compiler import ASTSource
    fn, const, cfg = _launch(case)
    const = {**const, **{n: 1 for n in unit_strides(fn)}}
    stored = QUANTIZED[case.quantized][1] if case.quantized else ""
    sig = signature(fn, case.dtype, case.factors or case.dtype, const, stored)
    div = [n for n in sig if sig[n].startswith("*")] + list(DIVISIBLE[case.kernel])
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, sig, const, attrs)
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
    if case.quantized:  # W's stored bytes, loaded as wide as the tile allows
        vec += " ldg_w"
    return (vec + (" mma" if mma else "")).strip()


def widest_w_load(case: Case, cfg) -> int:
    """How wide a thread's loads of a quantized W tile's bytes can be: its contiguous share
    of a row, at most 16 bytes (128 bits). Where the tile that fits the gate is too small
    for 16 bytes a thread (the backward at rank pad 128, fp32 compute past rank pad 16),
    narrower."""
    row_bytes = cfg.block_c // (2 if QUANTIZED[case.quantized][0] == W_4BIT else 1)
    return 8 * min(16, row_bytes, max(1, cfg.block_r * row_bytes // (32 * cfg.num_warps)))


_ASM_LOAD = re.compile(r'asm sideeffect "[^"]*?ld\.global(?:\.[\w:]+)*?\.(?:v(\d)\.)?b(\d+) '
                       r'[^"]*"\s*,\s*"[^"]*"\((.*)$', re.M)
_PTR = r"ptr addrspace\(1\) (%[\w.]+)"


def load_widths(llir: str, arg: int) -> set:
    """Bit widths of the global loads in a kernel's LLVM IR whose address derives from its
    ``arg``-th parameter (through getelementptr, phi and select): what the SASS alone
    cannot tell apart, e.g. W's bytes from a factor tile."""
    derived = {f"%{arg}"}
    defs = [(name, re.findall(_PTR, rest) + re.findall(r"\[ (%[\w.]+),", rest))
            for name, rest in re.findall(r"^\s*(%[\w.]+) = (?:getelementptr|phi|select)\b(.*)$",
                                         llir, re.M)]
    grown = True
    while grown:
        grown = False
        for name, operands in defs:
            if name not in derived and derived.intersection(operands):
                derived.add(name)
                grown = True
    return {int(vec or 1) * int(bits) for vec, bits, args in _ASM_LOAD.findall(llir)
            if derived.intersection(re.findall(_PTR, args))}


def compile_case(case: Case, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    src, options = _source(case)
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options), options


def _row(job) -> dict:
    from dev import sass
    arch, case = job
    kernel, options = compile_case(case, arch)
    row = sass.cubin_row(
        kernel.asm["cubin"], kernel=f"triton {case.kernel}" + (" atomic" if case.atomic else "")
        + (" dW" if case.need_dw else "") + (" f32-factors" if case.factors else "")
        + (f" W={case.quantized}" if case.quantized else ""),
        arch=arch, dtype=case.dtype, order=order_name(case.order), rank_pad=case.rank_pad,
        num_warps=options["num_warps"], contract=contract(case),
        launch_smem=kernel.metadata.shared)
    if case.quantized:  # the IR's parameters: the signature's less its constexprs
        params = [n for n, t in kernel.src.signature.items() if t != "constexpr"]
        widths = load_widths(kernel.asm["llir"], params.index("w_ptr"))
        row["w_load_bits"] = min(widths, default=0)
        row["ldg_w"] = widths == {widest_w_load(case, _launch(case)[2])}
    return row


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
