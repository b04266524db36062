"""Triton kernels: W' = W + W ⊙ expm1_K(s·u@p) in one pass, and its fused backward.

Both kernels work on the ``(R, M)`` unfolding of W (``R = C_out``) with any
row/column strides, and hold the whole (padded) rank in one tile: ``u`` rows
``(BLOCK_R, RP)`` and ``p`` columns ``(RP, BLOCK_C)`` feed one ``tl.dot``
(``RP >= 16``, a power of two, padded with masked loads: ``tl.dot`` rejects
an inner dimension below 16 when compiled for a GPU). Δ tiles live only in
registers. The series uses the Horner nesting of ``lie_kernels/series.py``::

    S_m(y) = 1 + y/m·(1 + y/(m+1)·( ... (1 + y/K))),  exp_K = S_1,  expm1_K = y·S_2

``ORDER`` is a compile-time constant; ``EXACT`` (-1) selects ``exp``.
"""
import triton
import triton.language as tl

EXACT = -1


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
def _tile(ptr, rows, cols, rmask, cmask, s_r, s_c):
    """Masked load of a 2-D tile with arbitrary strides (zeros outside)."""
    return tl.load(ptr + rows[:, None] * s_r + cols[None, :] * s_c,
                   mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """fp32 products with fp32 accumulation; fp32 inputs use IEEE (not tf32) precision."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, out_dtype=tl.float32)
    return acc


@triton.jit
def _fwd_tile(w_ptr, u_ptr, p_ptr, out_ptr, R, M, r, s_wr, s_wc, s_ur, s_uk, s_pk, s_pc,
              scale, pid_r, pid_c, ORDER: tl.constexpr, RP: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    """One (BLOCK_R, BLOCK_C) tile of W' = W + W·expm1_K(scale·u@p), stored contiguously."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, RP)
    rmask, cmask, kmask = rows < R, cols < M, ks < r
    x = _dot(_tile(u_ptr, rows, ks, rmask, kmask, s_ur, s_uk),
             _tile(p_ptr, ks, cols, kmask, cmask, s_pk, s_pc), DOT_FP32)
    w = _tile(w_ptr, rows, cols, rmask, cmask, s_wr, s_wc).to(tl.float32)
    out = w + w * expm1_series(scale * x, ORDER)
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def lie_fwd_kernel(w_ptr, u_ptr, p_ptr, out_ptr, R, M, r,
                   s_wr, s_wc, s_ur, s_uk, s_pk, s_pc, scale,
                   ORDER: tl.constexpr, RP: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, DOT_FP32: tl.constexpr):
    _fwd_tile(w_ptr, u_ptr, p_ptr, out_ptr, R, M, r, s_wr, s_wc, s_ur, s_uk, s_pk, s_pc,
              scale, tl.program_id(0), tl.program_id(1), ORDER, RP, BLOCK_R, BLOCK_C,
              DOT_FP32)


#: int64 columns of a grouped-launch table row (one row per layer)
TABLE_COLS = ("w", "u", "p", "out", "R", "M", "r", "s_wr", "s_wc", "s_ur", "s_uk", "s_pk",
              "s_pc", "col_tiles")


@triton.jit
def lie_fwd_grouped_kernel(table_ptr, tile_layer_ptr, tile_first_ptr, scale_ptr,
                           DTYPE: tl.constexpr, ORDER: tl.constexpr, RP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           DOT_FP32: tl.constexpr):
    """Many layers' W' in one launch: program ``pid`` looks up its layer and tile.

    ``tile_layer[pid]`` is the layer, ``tile_first[layer]`` its first program;
    the layer's pointers, sizes and strides come from its ``table`` row
    (columns ``TABLE_COLS``). Small layers stop being launch-bound.
    """
    pid = tl.program_id(0)
    layer = tl.load(tile_layer_ptr + pid)
    local = pid - tl.load(tile_first_ptr + layer)
    row = table_ptr + layer * 14
    col_tiles = tl.load(row + 13)
    _fwd_tile(tl.load(row + 0).to(tl.pointer_type(DTYPE)),
              tl.load(row + 1).to(tl.pointer_type(DTYPE)),
              tl.load(row + 2).to(tl.pointer_type(DTYPE)),
              tl.load(row + 3).to(tl.pointer_type(DTYPE)),
              tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
              tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11),
              tl.load(row + 12), tl.load(scale_ptr + layer), local // col_tiles,
              local % col_tiles, ORDER, RP, BLOCK_R, BLOCK_C, DOT_FP32)


@triton.jit
def lie_bwd_kernel(g_ptr, w_ptr, u_ptr, p_ptr, dw_ptr, du_part_ptr, dp_part_ptr,
                   R, M, r, tiles_per_split,
                   s_gr, s_gc, s_wr, s_wc, s_ur, s_uk, s_pk, s_pc, scale,
                   ORDER: tl.constexpr, DORDER: tl.constexpr, NEED_DW: tl.constexpr,
                   RP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: a row block × a run of column tiles.

    t = g ⊙ W ⊙ exp_{K-1}(s·x) stays in registers; ``du`` accumulates over the
    run and is stored once into ``du_part[split]``; ``dp`` partials go to
    ``dp_part[row_block]``. The host sums the partials in a fixed order, so
    the result is deterministic without atomics.
    """
    pid_r, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, RP)
    rmask, kmask = rows < R, ks < r
    u = _tile(u_ptr, rows, ks, rmask, kmask, s_ur, s_uk).to(tl.float32)
    du = tl.zeros((BLOCK_R, RP), dtype=tl.float32)
    for t_i in range(tiles_per_split):
        cols = (pid_s * tiles_per_split + t_i) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < M
        mask = rmask[:, None] & cmask[None, :]
        p = _tile(p_ptr, ks, cols, kmask, cmask, s_pk, s_pc).to(tl.float32)
        y = scale * _dot(u, p, True)
        g = _tile(g_ptr, rows, cols, rmask, cmask, s_gr, s_gc).to(tl.float32)
        w = _tile(w_ptr, rows, cols, rmask, cmask, s_wr, s_wc).to(tl.float32)
        if NEED_DW:
            tl.store(dw_ptr + rows[:, None] * M + cols[None, :],
                     (g * exp_series(y, ORDER)).to(dw_ptr.dtype.element_ty), mask=mask)
        t = g * w * exp_series(y, DORDER)
        du += _dot(t, tl.trans(p), True)
        dp = _dot(tl.trans(u), t, True)
        tl.store(dp_part_ptr + pid_r * r * M + ks[:, None] * M + cols[None, :], dp * scale,
                 mask=kmask[:, None] & cmask[None, :])
    tl.store(du_part_ptr + pid_s * R * r + rows[:, None] * r + ks[None, :], du * scale,
             mask=rmask[:, None] & kmask[None, :])
