"""Roofline model of the Triton kernels on an H200: what a GPU run should measure.

For a weight W with ``R × M`` elements (the ``(C_out, M)`` unfolding), rank r
(padded to ``rp``), element size ``e`` and order K, count what each launch
really moves through HBM and the work it does, with the backward's own tile
shapes, split counts and scratch (``triton_configs.config``, ``triton_backend.bwd_plan``):

    forward   reads W, u, p; writes W'                       (1 launch)
              MMA 2·rp·R·M flops (16-bit W) or rp·R·M FMAs (fp32 W)
    backward  reads g, W, u, p; writes dW when asked; three rank contractions
              (3× the forward's work). Then, by reduction:
      atomic (default; kernel "bwd"): adds with atomics into one fp32
              (R + M) × r accumulator; a finish launch reads it, writes du, dp in
              the factors' dtype and zeroes it back (2 launches)
      deterministic (kernel "bwd-det", torch.use_deterministic_algorithms):
              adds du into du_part (col_splits × R × r), stores dp_part
              (row_splits × r × M); the finish launch reads both, writes du, dp,
              zeroes du_part back (2 launches)
              What is added into is reused zeroed from call to call, dp_part from a
              pool that is never zeroed (backends/workspace.py); above
              workspace.MAX_FLOATS each is allocated per call: one memset (or, in
              deterministic mode, NaN fill) more. Deterministic mode also NaN-fills
              the outputs PyTorch allocates: du, dp (and dW) are written twice there
    elementwise fp32 FMAs: ~K+3 per element forward, ~2K+6 backward (exp: ~10)

    time = max(bytes / BW, mma_flops / MMA_PEAK + fma / FMA_PEAK) + launches · LAUNCH

The memory floor is ``2·R·M·e / BW`` forward and ``(2 or 3)·R·M·e / BW``
backward (read g and W, write dW when asked). ``frac_floor = floor / time`` is
what a measurement should approach; the sweep prints it beside the measured time.
Factor tiles re-read by every row block are counted once (they sit in L2).
The backward's atomic additions happen in L2, not HBM: ``l2_atomic_bytes``
reports them (du once per tile, dp once per tile run) and the time model
assumes they hide under the HBM stream; a GPU run checks that.

A quantized W (``quantized``: nf4/fp4/int8/fp8) is read as stored: its codes (half a
byte or one byte an element) and its fp32 scales (an absmax per ``blocksize`` elements,
or one per row), once a pass, and the floors count those bytes in place of W's R·M·e;
W' (forward) is written in the compute dtype ``dtype``, and the backward reads g in that
dtype and never writes dW. The dequantization's own
work (a table lookup or a convert, one or two multiplies) is counted as 2 FMAs an element.

Constants: the H200 copy bandwidth and bf16 MMA rate, both measured on that GPU;
LAUNCH is an assumption (a Triton launch from Python, ~3 µs).
"""
from __future__ import annotations

import csv
import itertools
import math
import os
from typing import Dict, Iterable, List, Optional

BW = 4.3e12            # bytes/s, H200 copy bandwidth (read + write), measured
MMA_PEAK = {"fp16": 790e12, "bf16": 790e12}   # flop/s, measured bf16 GEMM
FMA_PEAK = 33.5e12     # fp32 FMA/s (67 TFLOP/s)
LAUNCH = 3e-6          # s per launch (assumed)
ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
#: stored bytes per element of a quantized W, beside its scales
QBYTES = {"nf4": 0.5, "fp4": 0.5, "int8": 1, "fp8": 1}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def w_bytes(rows: int, cols: int, dtype: str, quantized: Optional[str] = None,
            blocksize: int = 64) -> int:
    """W's bytes as the kernels read them: dense in ``dtype``, or a quantized W's codes and
    fp32 scales (an absmax per ``blocksize`` elements for 4-bit kinds, one per row else)."""
    n = rows * cols
    if quantized is None:
        return n * ESIZE[dtype]
    scales = _cdiv(n, blocksize) if QBYTES[quantized] < 1 else rows
    return math.ceil(n * QBYTES[quantized]) + 4 * scales


def _elementwise(order: Optional[int], backward: bool) -> int:
    k = 10 if order is None else order
    return 2 * k + 6 if backward else k + 3


def predict(rows: int, cols: int, rank: int, dtype: str, order: Optional[int],
            kernel: str, need_dw: bool = False, factor_dtype: Optional[str] = None,
            quantized: Optional[str] = None, blocksize: int = 64) -> Dict:
    """Bytes, work and predicted H200 time of one pass (``kernel``: "fwd", "bwd" with
    atomics, or "bwd-det", the deterministic reduction); ``quantized``: W's kind when it
    is a quantized W (``dtype`` is then its compute dtype; no dW)."""
    from ..backends import workspace
    from ..backends.triton_backend import bwd_plan
    from ..backends.triton_configs import QUANTIZED_FORMATS, config
    e, ef = ESIZE[dtype], ESIZE[factor_dtype or dtype]
    n, rp = rows * cols, _rank_pad(rank)
    factors = (rows * rank + rank * cols) * ef
    w_read = w_bytes(rows, cols, dtype, quantized, blocksize)
    l2_atomic = 0
    if kernel == "fwd":
        floor = w_read + n * e
        moved, partial, launches, contractions = floor + factors, 0, 1, 1
    else:
        floor = w_read + n * e + (n * e if need_dw else 0)
        w_format = QUANTIZED_FORMATS[quantized] if quantized else "dense"
        plan = bwd_plan(rows, cols, config("bwd", dtype, rp, factor_dtype == "fp32", w_format),
                        atomic=kernel == "bwd")
        partial = 4 * plan.scratch_floats(rows, cols, rank)
        col_tiles = _cdiv(cols, plan.cfg.block_c)
        # du: one addition per (row, rank, column tile); dp: one per row split (atomics only)
        l2_atomic = 4 * rank * (rows * col_tiles + (cols * plan.row_splits if plan.atomic
                                                    else 0))
        # the finish launch reads the scratch and zeroes back what was added into; the
        # rest (the deterministic dp_part) the kernel stores: 2 passes over it either way
        zeroed = 4 * plan.zeroed_floats(rows, cols, rank)
        scratch, launches = 2 * partial, 2
        # too big to keep: allocated per call, so zeroed (a memset) or, in deterministic
        # mode, NaN-filled by PyTorch (torch.utils.deterministic): one launch and pass more
        for fresh in (zeroed, partial - zeroed):
            if fresh > 4 * workspace.MAX_FLOATS:
                launches, scratch = launches + 1, scratch + fresh
        if not plan.atomic:  # that fill also hits the outputs: du, dp (and dW) once more
            launches += 3 if need_dw else 2
            scratch += factors + (n * e if need_dw else 0)
        moved = floor + factors + scratch + factors
        contractions = 3
    if dtype == "fp32":  # FMA dots (see triton_kernels: why not tf32)
        mma, fma = 0.0, contractions * rp * n
    else:
        mma, fma = contractions * 2 * rp * n, 0
    fma += (_elementwise(order, kernel != "fwd") + (2 if quantized else 0)) * n
    t_mem = moved / BW
    t_compute = (mma / MMA_PEAK[dtype] if mma else 0.0) + fma / FMA_PEAK
    time = max(t_mem, t_compute) + launches * LAUNCH
    return dict(bytes=moved, floor_bytes=floor, bytes_x_floor=moved / floor,
                partial_bytes=partial, partial_x_w=partial / (n * e),
                l2_atomic_bytes=l2_atomic, mma_flops=mma,
                fma=fma, t_mem_us=t_mem * 1e6, t_compute_us=t_compute * 1e6,
                launches=launches, time_us=time * 1e6,
                floor_us=floor / BW * 1e6, frac_floor=floor / BW / time)


def predict_linear_grad(c_out: int, c_in: int, tokens: int, rank: int, dtype: str,
                        fused: bool) -> Dict:
    """A Linear layer's path from ``g_y (N, C_out)`` and ``x (N, C_in)`` to du, dp
    (order 1, 16-bit factors), the part that differs between the two ways to run it:

    fused    one ``lie_linear_bwd_kernel`` (the GEMM ``g_yᵀx`` with the Lie backward as
             its epilogue) and the finish launch that casts the fp32 accumulators
    unfused  the GEMM writes dL/dW' (W-sized), then ``predict(..., "bwd")`` reads it back

    Both do the GEMM's ``2·N·C_out·C_in`` flops on tensor cores and read the GEMM's
    operands as the fused kernel's grouped order does: g_y once, x once per group of
    ``LINEAR_GROUP`` row tiles (assumed for cuBLAS too). Returns bytes, flops and
    predicted time; ``unfused - fused`` time is what ``bench linear`` should measure as
    the saving.
    """
    from ..backends.triton_backend import LINEAR_GROUP
    from ..backends.triton_configs import config
    e = ESIZE[dtype]
    gemm_flops = 2 * tokens * c_out * c_in
    block_r = config("linear", dtype, _rank_pad(rank)).block_r
    row_groups = _cdiv(_cdiv(c_out, block_r), LINEAR_GROUP)
    io = tokens * (c_out + c_in * row_groups) * e
    lie = predict(c_out, c_in, rank, dtype, 1, "bwd")
    flops = gemm_flops + lie["mma_flops"]
    if fused:
        # the epilogue reads W and the factors instead of dL/dW' and W: one W-read less
        moved = io + lie["bytes"] - c_out * c_in * e
        t = max(moved / BW, flops / MMA_PEAK[dtype]) + lie["launches"] * LAUNCH
    else:
        gemm_bytes = io + c_out * c_in * e  # writes dL/dW'
        moved = gemm_bytes + lie["bytes"]
        t = (max(gemm_bytes / BW, gemm_flops / MMA_PEAK[dtype]) + LAUNCH
             + lie["time_us"] * 1e-6)
    return dict(bytes=moved, flops=flops, time_us=t * 1e6)


def predict_mode(shape, rank: int, dtype: str, order: Optional[int], mode: str) -> Dict:
    """A sweep point: ``mode`` "fwd" or "fwdbwd" (forward then backward, no dW)."""
    rows, cols = shape[0], math.prod(shape[1:])
    fwd = predict(rows, cols, rank, dtype, order, "fwd")
    if mode == "fwd":
        return fwd
    if order == 0:  # no backward kernel: the factors' gradients are zeros
        return fwd
    bwd = predict(rows, cols, rank, dtype, order, "bwd")
    time = fwd["time_us"] + bwd["time_us"]
    floor = fwd["floor_us"] + bwd["floor_us"]
    return dict(bytes=fwd["bytes"] + bwd["bytes"],
                bytes_x_floor=(fwd["bytes"] + bwd["bytes"]) /
                (fwd["floor_bytes"] + bwd["floor_bytes"]),
                time_us=time, floor_us=floor, frac_floor=floor / time,
                fwd_frac=fwd["frac_floor"], bwd_frac=bwd["frac_floor"],
                partial_x_w=bwd["partial_x_w"])


#: the stored formats of a Linear (2-D) W in the table beside dense, each at the compute
#: dtypes QUANTIZED_DTYPES: QLoRA's bf16 and bitsandbytes' default fp32
QUANTIZED_W = ("nf4", "int8", "fp8")
QUANTIZED_DTYPES = ("bf16", "fp32")


def table(cases: Iterable, dtypes=("bf16", "fp16", "fp32"), orders=(1, 4, None)) -> List[Dict]:
    """One row per (sweep case, W's format, dtype, order, pass) with the Triton kernels'
    prediction: every case dense; a 2-D (Linear) case also with W stored in each of
    ``QUANTIZED_W`` (``dtype``: the compute dtype; the backward writes no dW)."""
    out = []
    for case in cases:
        rows, cols = case.shape[0], math.prod(case.shape[1:])
        formats = [(None, dtypes)]
        if len(case.shape) == 2:
            formats += [(q, QUANTIZED_DTYPES) for q in QUANTIZED_W]
        for quantized, dts in formats:
            for dtype, order, kernel in itertools.product(dts, orders,
                                                          ("fwd", "bwd", "bwd-det")):
                p = predict(rows, cols, case.rank, dtype, order, kernel, quantized=quantized)
                out.append(dict(case=case.name, shape="x".join(map(str, case.shape)),
                                w=quantized or "dense", rank=case.rank, dtype=dtype,
                                order="exact" if order is None else order, kernel=kernel,
                                MB=round(p["bytes"] / 1e6, 3),
                                x_floor=round(p["bytes_x_floor"], 3),
                                partial_x_W=round(p["partial_x_w"], 3),
                                l2_atomic_MB=round(p["l2_atomic_bytes"] / 1e6, 3),
                                mem_us=round(p["t_mem_us"], 2),
                                compute_us=round(p["t_compute_us"], 2),
                                pred_us=round(p["time_us"], 2),
                                floor_us=round(p["floor_us"], 2),
                                frac_floor=round(p["frac_floor"], 3)))
    return out


def format_rows(rows: List[Dict]) -> List[str]:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).rjust(widths[k]) for k in keys) for r in rows]
    return lines


def write_csv(rows: List[Dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run(out_dir: str, log=print, ranks: Optional[List[int]] = None) -> List[Dict]:
    """Print the predicted table for the sweep shapes and write ``roofline.csv``."""
    from .shapes import SWEEP
    cases = [c._replace(rank=r) for c in SWEEP for r in (ranks or [c.rank])]
    rows = table(cases)
    log(f"# H200 roofline of the Triton kernels: BW {BW / 1e12} TB/s, bf16 MMA "
        f"{MMA_PEAK['bf16'] / 1e12:.0f} TFLOP/s, fp32 FMA {FMA_PEAK / 1e12} T/s, "
        f"launch {LAUNCH * 1e6:.0f} us (assumed)")
    log("# x_floor: bytes moved / bytes floor; frac_floor: floor time / predicted time; "
        "partial_x_W: fp32 scratch / W's bytes")
    log("# w: W as stored, dense or quantized (then dtype is the compute dtype, W' and g "
        "are in it, no dW; the floor reads the stored codes and scales once a pass)")
    log("# kernel bwd: atomic reduction (default); bwd-det: split partials summed in a "
        "fixed order (torch.use_deterministic_algorithms); l2_atomic_MB: atomic additions "
        "served by L2, not in x_floor (assumed hidden under the HBM stream)")
    for line in format_rows(rows):
        log(line)
    path = os.path.join(out_dir, "roofline.csv")
    write_csv(rows, path)
    log(f"# wrote {path}")
    return rows
