"""Triton kernels: W' = W + W ⊙ expm1_K(s·u@p) in one pass, and its fused backward.

``lie_fwd_kernel`` (and the grouped ``lie_fwd_grouped_kernel``) build W';
``lie_bwd_kernel`` takes ``dL/dW'`` to dW, du, dp with either reduction (fp32
atomics, or split partials that ``lie_reduce_kernel`` sums in a fixed order);
``lie_linear_bwd_kernel`` computes ``dL/dW' = g_yᵀx`` of a Linear layer itself,
tile by tile, with the same Lie backward as its epilogue.

All kernels work on an ``(R, M)`` view of W (``R = C_out``; columns in W's
memory order, any row/column strides) and hold the whole (padded) rank in one
tile: ``u`` rows ``(BLOCK_R, RP)`` and ``p`` columns ``(RP, BLOCK_C)`` feed one
``tl.dot`` (``RP >= 16``, a power of two, padded with masked loads: ``tl.dot``
rejects an inner dimension below 16 when compiled for a GPU). Δ tiles live
only in registers. The series uses the Horner nesting of ``lie_kernels/series.py``::

    S_m(y) = 1 + y/m·(1 + y/(m+1)·( ... (1 + y/K))),  exp_K = S_1,  expm1_K = y·S_2

``ORDER`` is a compile-time constant, ``lie_kernels.order.encode_order(order)``: -1
(``order.EXACT``) selects ``exp``.

Rank contractions (``DOT``): ``DOT_16`` multiplies 16-bit operands (W's dtype)
on tensor cores with fp32 accumulation; ``DOT_IEEE`` is plain fp32 FMA (fp32 W,
and the interpreter, where bf16 dots are not emulated faithfully). Why not tf32
for fp32 W: u@p with tf32-rounded operands (emulated in torch, 512×1024, r=16)
has 3.2e-4 max relative error against fp64, above the 1e-4 fp32 budget (fp32
FMA: 1.3e-7; 3xtf32: 1.1e-7), and the 3xtf32 split compiled to 255 registers
with spills and up to 180 KB shared memory per block in this tile design.

Offsets: every row/column index is widened to int64 before it meets a stride,
so views whose offsets pass 2**31 elements are indexed exactly.

Quantized W (``W_FMT``, ``lie_kernels/quant.py``): ``_w_tile`` dequantizes each W tile
in registers from the stored bytes (one pass over them, no dense copy of W), in fp32,
with the same operations in the same order as ``QuantizedWeight.rows`` (bitwise the
same values). ``W_4BIT`` (``_w4_tile``): the tile's packed bytes, ``BLOCK_C/2`` per row,
are loaded as contiguous 16-byte chunks (128-bit loads), split into high and low
nibbles, each looked up in the 16-entry code table (a gather from a 64-byte table that
stays in L1) and scaled by its absmax (both nibbles of a byte share one: the block size
is even; a chunk spans at most two blocks: it is at least 32), then interleaved into the
``(BLOCK_R, BLOCK_C)`` tile, high nibble first. That needs an even M, so that every row
starts on a byte. ``W_INT8``/``W_FP8``: the codes times the row's scale (int8: then
times ``INT8_STEP``, as bitsandbytes does). The 16-bit dot operands take the compute
dtype from W' (``out_ptr``) or dW (``dw_ptr``, passed in that dtype even when dW is not
asked for), never from W's storage.
"""
import triton
import triton.language as tl

from ..quant import INT8_STEP as _INT8_STEP

DOT_16, DOT_IEEE = 0, 1
#: W's storage (``W_FMT``): dense in the compute dtype, 4-bit codes two per byte with
#: an absmax per ``QBLOCK`` elements (nf4, fp4), int8 or fp8 e4m3 with a scale per row
W_DENSE, W_4BIT, W_INT8, W_FP8 = 0, 1, 2, 3
INT8_STEP = tl.constexpr(_INT8_STEP)


@triton.jit
def _nested(y, ORDER: tl.constexpr, M: tl.constexpr):
    """S_M(y) for ORDER >= M, innermost term first."""
    s = 1.0 + y * (1.0 / ORDER)
    for j in tl.static_range(ORDER - M):
        s = 1.0 + y * s * (1.0 / (ORDER - 1 - j))
    return s


@triton.jit
def exp_series(y, ORDER: tl.constexpr):
    """exp_K(y); ORDER = EXACT (-1) gives exp(y)."""
    if ORDER == -1:
        e = tl.exp(y)
    elif ORDER == 0:
        e = y * 0.0 + 1.0
    else:
        e = _nested(y, ORDER, 1)
    return e


@triton.jit
def expm1_series(y, ORDER: tl.constexpr):
    """expm1_K(y) = exp_K(y) - 1, formed without the cancellation of ``exp_K(y) - 1``."""
    if ORDER == -1:
        e = tl.exp(y) - 1.0  # one rounding near 1: ~1 ulp of W' after W + W·e
    elif ORDER == 0:
        e = y * 0.0
    elif ORDER == 1:
        e = y
    else:
        e = y * _nested(y, ORDER, 2)
    return e


@triton.jit
def lie_map(w, y, ORDER: tl.constexpr):
    """W + W·expm1_K(y), and exactly W where expm1_K(y) == 0 (so W = ±inf stays
    ±inf at Δ = 0 instead of inf + inf·0 = NaN)."""
    e = expm1_series(y, ORDER)
    return tl.where(e == 0.0, w, w + w * e)


@triton.jit
def _offsets(rows, cols, s_r, s_c):
    """int64 element offsets of a 2-D tile (row × stride can pass 2**31)."""
    return rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def _tile(ptr, rows, cols, rmask, cmask, s_r, s_c):
    """Masked load of a 2-D tile with arbitrary strides (zeros outside)."""
    return tl.load(ptr + _offsets(rows, cols, s_r, s_c),
                   mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _w4_tile(w_ptr, code_ptr, wscale_ptr, rows, c0, rmask, s_wr, QBLOCK: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """A 4-bit W's tile at ``rows`` × ``c0 + arange(BLOCK_C)`` in fp32 (module docstring).
    The bytes come as (rows, chunks, CH): one 128-bit load per chunk of 16 bytes. Byte
    b of a row holds its columns 2b (high nibble) and 2b + 1; ``s_wr`` = M/2 bytes per
    row. A chunk spans at most two absmax blocks (QBLOCK/2 >= CH bytes each), so it
    reads two absmax values, those of its first and last byte, not one per byte."""
    CH: tl.constexpr = 16 if BLOCK_C >= 32 else BLOCK_C // 2
    HB: tl.constexpr = QBLOCK // 2  # bytes per absmax block
    tl.static_assert(HB >= CH, "a chunk must span at most two absmax blocks")
    start = c0 // 2 + tl.arange(0, BLOCK_C // 2 // CH) * CH
    byte = start[:, None] + tl.arange(0, CH)[None, :]
    row0 = rows.to(tl.int64)[:, None] * s_wr
    offs = row0[:, :, None] + byte[None, :, :]
    # bound the row by s_wr, not M // 2: the JIT sees s_wr's divisibility by 16, so the
    # mask is constant over a chunk (128-bit loads)
    packed = tl.load(w_ptr + offs, mask=rmask[:, None, None] & (byte < s_wr)[None, :, :],
                     other=0)
    first = row0 + start[None, :]
    last = tl.minimum(first + CH - 1, row0 + s_wr - 1)
    chunk_mask = rmask[:, None] & (start < s_wr)[None, :]
    a_first = tl.load(wscale_ptr + first // HB, mask=chunk_mask, other=0.0)[:, :, None]
    a_last = tl.load(wscale_ptr + last // HB, mask=chunk_mask, other=0.0)[:, :, None]
    absmax = tl.where(offs // HB == (first // HB)[:, :, None], a_first, a_last)
    hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * absmax
    lo = tl.load(code_ptr + (packed & 15).to(tl.int32)) * absmax
    return tl.reshape(tl.interleave(hi, lo), (rows.shape[0], BLOCK_C))


@triton.jit
def _w_tile(w_ptr, code_ptr, wscale_ptr, rows, cols, c0, rmask, cmask, s_wr, s_wc,
            W_FMT: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """W's tile at ``rows`` × ``cols`` (``cols = c0 + arange(BLOCK_C)``): as stored for a
    dense W (``W_FMT`` = W_DENSE, 0), dequantized to fp32 otherwise (W_4BIT 1, W_INT8 2,
    W_FP8 3). Quantized storage is contiguous: ``s_wr`` is a row's length in bytes,
    ``s_wc`` 1."""
    if W_FMT == 0:
        w = _tile(w_ptr, rows, cols, rmask, cmask, s_wr, s_wc)
    elif W_FMT == 1:
        w = _w4_tile(w_ptr, code_ptr, wscale_ptr, rows, c0, rmask, s_wr, QBLOCK, BLOCK_C)
    else:
        w = _tile(w_ptr, rows, cols, rmask, cmask, s_wr, s_wc).to(tl.float32) * \
            tl.load(wscale_ptr + rows, mask=rmask, other=0.0)[:, None]
        if W_FMT == 2:
            w = w * INT8_STEP
    return w


@triton.jit
def _dot(a, b, DOT: tl.constexpr, OP_TY: tl.constexpr):
    """a @ b with fp32 accumulation; OP_TY is the 16-bit operand type for DOT_16."""
    if DOT == 0:
        acc = tl.dot(a.to(OP_TY), b.to(OP_TY), out_dtype=tl.float32)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _operand(x, DOT: tl.constexpr, OP_TY: tl.constexpr):
    """A factor tile as the dot will read it: fp32 factors over a 16-bit W are
    rounded to W's dtype once at load, not at each of their two dots (halves
    their registers; the same values reach the tensor cores)."""
    if DOT == 0:
        x = x.to(OP_TY)
    return x


@triton.jit
def _fwd_tile(w_ptr, code_ptr, wscale_ptr, u_ptr, p_ptr, out_ptr, R, M, r, s_wr, s_wc, s_ur,
              s_uk, s_pk, s_pc, s_or, s_oc, scale, pid_r, pid_c, ORDER: tl.constexpr,
              RP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              DOT: tl.constexpr, W_FMT: tl.constexpr, QBLOCK: tl.constexpr):
    """One (BLOCK_R, BLOCK_C) tile of W' = W + W·expm1_K(scale·u@p)."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < R, cols < M
    w = _w_tile(w_ptr, code_ptr, wscale_ptr, rows, cols, c0, rmask, cmask, s_wr, s_wc, W_FMT,
                QBLOCK, BLOCK_C)
    if ORDER == 0:
        out = w  # exp_0 = 1: W' = W bitwise, no contraction
    else:
        ks = tl.arange(0, RP)
        kmask = ks < r
        x = _dot(_tile(u_ptr, rows, ks, rmask, kmask, s_ur, s_uk),
                 _tile(p_ptr, ks, cols, kmask, cmask, s_pk, s_pc), DOT,
                 out_ptr.dtype.element_ty)
        out = lie_map(w.to(tl.float32), scale * x, ORDER)
    tl.store(out_ptr + _offsets(rows, cols, s_or, s_oc), out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def lie_fwd_kernel(w_ptr, code_ptr, wscale_ptr, u_ptr, p_ptr, out_ptr, R, M, r,
                   s_wr, s_wc, s_ur, s_uk, s_pk, s_pc, s_or, s_oc, scale, col_tiles,
                   ORDER: tl.constexpr, RP: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, DOT: tl.constexpr, W_FMT: tl.constexpr,
                   QBLOCK: tl.constexpr):
    """1-D grid of row_blocks × col_tiles programs (no 65535 limit on a grid axis).
    ``code_ptr``, ``wscale_ptr``, ``QBLOCK``: a quantized W's dequantization (unused
    for a dense W)."""
    pid = tl.program_id(0)
    _fwd_tile(w_ptr, code_ptr, wscale_ptr, u_ptr, p_ptr, out_ptr, R, M, r, s_wr, s_wc, s_ur,
              s_uk, s_pk, s_pc, s_or, s_oc, scale, pid // col_tiles, pid % col_tiles, ORDER,
              RP, BLOCK_R, BLOCK_C, DOT, W_FMT, QBLOCK)


#: int64 columns of a grouped-launch table row (one row per layer); ``out`` is an
#: element offset into the launch's output buffer, so the table outlives the outputs
TABLE_COLS = ("w", "u", "p", "out", "R", "M", "r", "s_wr", "s_wc", "s_ur", "s_uk", "s_pk",
              "s_pc", "col_tiles", "first_tile")
# the column indices as compile-time constants, so the kernel reads the row by name
(COL_W, COL_U, COL_P, COL_OUT, COL_R, COL_M, COL_RANK, COL_S_WR, COL_S_WC, COL_S_UR, COL_S_UK,
 COL_S_PK, COL_S_PC, COL_COL_TILES, COL_FIRST_TILE) = map(tl.constexpr, range(len(TABLE_COLS)))
TABLE_WIDTH = tl.constexpr(len(TABLE_COLS))


@triton.jit
def lie_fwd_grouped_kernel(table_ptr, tile_layer_ptr, scale_ptr, out_ptr,
                           DTYPE: tl.constexpr, UP_DTYPE: tl.constexpr, ORDER: tl.constexpr,
                           RP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           DOT: tl.constexpr):
    """Many layers' W' in one launch: program ``pid`` looks up its layer and tile.

    ``tile_layer[pid]`` is the layer; the layer's pointers, sizes, strides and
    first program come from its ``table`` row (columns ``TABLE_COLS``); its W'
    is stored contiguously at ``out_ptr + table[layer].out``.
    """
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    row = table_ptr + layer * TABLE_WIDTH
    col_tiles = tl.load(row + COL_COL_TILES)
    local = pid - tl.load(row + COL_FIRST_TILE)
    M = tl.load(row + COL_M)
    w_ptr = tl.load(row + COL_W).to(tl.pointer_type(DTYPE))
    _fwd_tile(w_ptr, w_ptr, w_ptr,  # dense W only: no dequantization pointers
              tl.load(row + COL_U).to(tl.pointer_type(UP_DTYPE)),
              tl.load(row + COL_P).to(tl.pointer_type(UP_DTYPE)),
              out_ptr + tl.load(row + COL_OUT),
              tl.load(row + COL_R), M, tl.load(row + COL_RANK), tl.load(row + COL_S_WR),
              tl.load(row + COL_S_WC), tl.load(row + COL_S_UR), tl.load(row + COL_S_UK),
              tl.load(row + COL_S_PK), tl.load(row + COL_S_PC), M, 1,
              tl.load(scale_ptr + layer), local // col_tiles, local % col_tiles, ORDER, RP,
              BLOCK_R, BLOCK_C, DOT, 0, 0)  # W_FMT = W_DENSE


@triton.jit
def _grad_tile(g, y, w_ptr, code_ptr, wscale_ptr, dw_ptr, rows, cols, c0, rmask, cmask,
               s_wr, s_wc, s_dr, s_dc, ORDER: tl.constexpr, DORDER: tl.constexpr,
               NEED_DW: tl.constexpr, W_FMT: tl.constexpr, QBLOCK: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """The Lie backward of one tile, given ``g = dL/dW'`` there (fp32) and
    ``y = s·u@p``: stores ``dW = g ⊙ exp_K(y)`` when asked and returns
    ``t = g ⊙ W ⊙ exp_{K-1}(y)``, from which ``du = s·t pᵀ``, ``dp = s·uᵀ t``.
    (Callers form y before loading g, and add dp before du: the order in which
    every configuration compiles without spills.)"""
    w = _w_tile(w_ptr, code_ptr, wscale_ptr, rows, cols, c0, rmask, cmask, s_wr, s_wc, W_FMT,
                QBLOCK, BLOCK_C).to(tl.float32)
    if NEED_DW:
        tl.store(dw_ptr + _offsets(rows, cols, s_dr, s_dc),
                 (g * exp_series(y, ORDER)).to(dw_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
    return g * w * exp_series(y, DORDER)


@triton.jit
def _add_du(du_ptr, t, p, rows, ks, r, rmask, kmask, scale, DOT: tl.constexpr, OP_TY):
    """``du[rows] += s·t pᵀ`` with relaxed fp32 atomics."""
    tl.atomic_add(du_ptr + _offsets(rows, ks, r, 1), scale * _dot(t, tl.trans(p), DOT, OP_TY),
                  mask=rmask[:, None] & kmask[None, :], sem="relaxed")


@triton.jit
def lie_bwd_kernel(g_ptr, w_ptr, code_ptr, wscale_ptr, u_ptr, p_ptr, dw_ptr, du_part_ptr,
                   dp_part_ptr, R, M, r, row_blocks_per_split, col_tiles_per_split, col_splits,
                   s_gr, s_gc, s_wr, s_wc, s_ur, s_uk, s_pk, s_pc, s_dr, s_dc, scale,
                   ORDER: tl.constexpr, DORDER: tl.constexpr, NEED_DW: tl.constexpr,
                   RP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   DOT: tl.constexpr, ATOMIC: tl.constexpr, W_FMT: tl.constexpr,
                   QBLOCK: tl.constexpr):
    """One program: a run of row blocks × a run of column tiles (fixed split counts).

    Per tile ``t = g ⊙ W ⊙ exp_{K-1}(s·x)`` stays in registers. ``s·dp`` of a
    column tile accumulates in registers over the program's row run and is
    flushed once per tile; ``s·du`` of a row block is added once per tile with
    a relaxed fp32 atomic (a load-add-store there made ptxas spill at rank pads
    64/128 in fp32). Two reductions:

    * ``ATOMIC=False`` (deterministic): ``dp`` is stored into
      ``dp_part[row_split]`` (every element, every call: it needs no zeroing);
      ``du`` goes to the program's own rows of
      ``du_part[col_split]`` (zeroed by the caller, cache resident). Only this
      program touches those rows, and each element always from the same thread
      (the layout is fixed at compile time), so its additions land in program
      order: column tile 0, 1, 2, ... A second kernel sums the splits in a fixed
      order: the same bits on every run and every GPU. Scratch:
      ``4·r·(row_splits·M + col_splits·R)`` bytes.
    * ``ATOMIC=True``: ``du`` and ``dp`` are added into one ``(R, r)`` and one
      ``(r, M)`` fp32 accumulator (zeroed by the caller): ``4·r·(R + M)``
      bytes. The order of the additions, and so the last bits, vary from run
      to run.
    """
    pid = tl.program_id(0)
    op_ty = dw_ptr.dtype.element_ty
    split_r, split_c = pid // col_splits, pid % col_splits
    ks = tl.arange(0, RP)
    kmask = ks < r
    if ATOMIC:
        du_base = du_part_ptr
        dp_base = dp_part_ptr
    else:
        du_base = du_part_ptr + split_c.to(tl.int64) * R * r
        dp_base = dp_part_ptr + split_r.to(tl.int64) * r * M
    for ct in range(col_tiles_per_split):
        c0 = (split_c * col_tiles_per_split + ct) * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < M
        p = _operand(_tile(p_ptr, ks, cols, kmask, cmask, s_pk, s_pc), DOT, op_ty)
        dp = tl.zeros((RP, BLOCK_C), dtype=tl.float32)
        for rb in range(row_blocks_per_split):
            rows = (split_r * row_blocks_per_split + rb) * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < R
            u = _operand(_tile(u_ptr, rows, ks, rmask, kmask, s_ur, s_uk), DOT, op_ty)
            y = scale * _dot(u, p, DOT, op_ty)
            g = _tile(g_ptr, rows, cols, rmask, cmask, s_gr, s_gc).to(tl.float32)
            t = _grad_tile(g, y, w_ptr, code_ptr, wscale_ptr, dw_ptr, rows, cols, c0, rmask,
                           cmask, s_wr, s_wc, s_dr, s_dc, ORDER, DORDER, NEED_DW, W_FMT, QBLOCK,
                           BLOCK_C)
            dp += _dot(tl.trans(u), t, DOT, op_ty)
            _add_du(du_base, t, p, rows, ks, r, rmask, kmask, scale, DOT, op_ty)
        dp_ptrs = dp_base + _offsets(ks, cols, M, 1)
        dp_mask = kmask[:, None] & cmask[None, :]
        if ATOMIC:
            tl.atomic_add(dp_ptrs, scale * dp, mask=dp_mask, sem="relaxed")
        else:
            tl.store(dp_ptrs, scale * dp, mask=dp_mask)


@triton.jit
def lie_linear_bwd_kernel(gy_ptr, x_ptr, w_ptr, code_ptr, wscale_ptr, u_ptr, p_ptr, dw_ptr,
                          du_acc_ptr, dp_acc_ptr, N, R, M, r, s_gn, s_gr, s_xn, s_xc, s_wr, s_wc,
                          s_ur, s_uk, s_pk, s_pc, s_dr, s_dc, scale, col_tiles,
                          ORDER: tl.constexpr, DORDER: tl.constexpr, NEED_DW: tl.constexpr,
                          RP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_N: tl.constexpr, GROUP_R: tl.constexpr, DOT: tl.constexpr,
                          W_FMT: tl.constexpr, QBLOCK: tl.constexpr):
    """A Linear layer's backward into its Lie factors: ``dL/dW' = grad_yᵀ x`` one
    ``(BLOCK_R, BLOCK_C)`` tile per program, accumulated in registers over the N rows
    of ``grad_y (N, R)`` and ``x (N, M)``, then the Lie backward of that tile as the
    GEMM's epilogue (``_grad_tile``): dL/dW' is never written. ``du``/``dp``: relaxed
    fp32 atomics into zeroed accumulators, as ``lie_bwd_kernel`` with ``ATOMIC``.

    Programs run in groups of ``GROUP_R`` row tiles per column tile (consecutive
    programs share an x column slice while it sits in L2), so x is read from HBM
    about once per group of row tiles instead of once per row tile."""
    pid = tl.program_id(0)
    op_ty = dw_ptr.dtype.element_ty
    per_group = GROUP_R * col_tiles
    first = (pid // per_group) * GROUP_R
    in_group = tl.minimum(tl.cdiv(R, BLOCK_R) - first, GROUP_R)
    rows = (first + (pid % per_group) % in_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = ((pid % per_group) // in_group) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < R, cols < M
    g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N
        g += _dot(tl.trans(_tile(gy_ptr, ns, rows, nmask, rmask, s_gn, s_gr)),
                  _tile(x_ptr, ns, cols, nmask, cmask, s_xn, s_xc), DOT, op_ty)
    ks = tl.arange(0, RP)
    kmask = ks < r
    u = _operand(_tile(u_ptr, rows, ks, rmask, kmask, s_ur, s_uk), DOT, op_ty)
    p = _operand(_tile(p_ptr, ks, cols, kmask, cmask, s_pk, s_pc), DOT, op_ty)
    y = scale * _dot(u, p, DOT, op_ty)
    t = _grad_tile(g, y, w_ptr, code_ptr, wscale_ptr, dw_ptr, rows, cols, c0, rmask, cmask,
                   s_wr, s_wc, s_dr, s_dc, ORDER, DORDER, NEED_DW, W_FMT, QBLOCK, BLOCK_C)
    tl.atomic_add(dp_acc_ptr + _offsets(ks, cols, M, 1),
                  scale * _dot(tl.trans(u), t, DOT, op_ty),
                  mask=kmask[:, None] & cmask[None, :], sem="relaxed")
    _add_du(du_acc_ptr, t, p, rows, ks, r, rmask, kmask, scale, DOT, op_ty)


@triton.jit
def _split_sum(part_ptr, out_ptr, n, splits, pid, BLOCK: tl.constexpr, ZERO: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    zero = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(splits):  # fixed order: deterministic; 64-bit pointer steps
        acc += tl.load(ptrs, mask=mask, other=0.0)
        if ZERO:
            tl.store(ptrs, zero, mask=mask)  # leave the scratch zeroed for the next call
        ptrs += n
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lie_reduce_kernel(du_part_ptr, du_ptr, n_du, du_splits, du_progs,
                      dp_part_ptr, dp_ptr, n_dp, dp_splits, BLOCK: tl.constexpr,
                      ZERO_DP: tl.constexpr):
    """du = Σ_s du_part[s] and dp = Σ_s dp_part[s] (already scaled), cast to the
    factors' dtypes, in one launch (programs below ``du_progs`` do du). The parts
    that were added into are zeroed as they are read (the backend reuses them:
    ``workspace.py``); ``ZERO_DP=False`` leaves dp_part, which the deterministic
    backward stores whole on every call, as it is."""
    pid = tl.program_id(0)
    if pid < du_progs:
        _split_sum(du_part_ptr, du_ptr, n_du, du_splits, pid, BLOCK, True)
    else:
        _split_sum(dp_part_ptr, dp_ptr, n_dp, dp_splits, pid - du_progs, BLOCK, ZERO_DP)
