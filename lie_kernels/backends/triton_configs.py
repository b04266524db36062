"""Tile shapes of every Triton launch on a GPU: one table, read by the backend and by the
kernel health gate (``dev/kernel_report.py``), keyed by kernel, W's (compute) dtype, rank
pad, whether the factors are fp32 over a 16-bit W, and W's storage format ("dense", or a
quantized W's "4bit" (nf4, fp4) or "8bit" (int8, fp8)).

Each entry passes the gate (no spills, <= 64 KB shared memory, >= 2 blocks/SM, 128-bit
accesses, MMA in 16 bits). fp32 tiles are smaller: FMA dots hold whole rank vectors per
thread. Where fp32 factors over a 16-bit W need a smaller tile than W's own dtype, the
larger one spilled (8 bytes) when compiled.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple


class Config(NamedTuple):
    """Tile shape and warps of one launch (``block_n``: the fused Linear backward's GEMM
    steps over the batch in blocks of that many rows; 0 elsewhere)."""
    block_r: int
    block_c: int
    num_warps: int
    num_stages: int
    block_n: int = 0


RANK_PADS = (16, 32, 64, 128)
KERNELS = ("fwd", "bwd", "linear", "grouped")
DTYPES = ("fp32", "fp16", "bf16")
W_FORMATS = ("dense", "4bit", "8bit")
#: a quantized kind (``quant.KINDS``) -> its tiles' W format
QUANTIZED_FORMATS = {"nf4": "4bit", "fp4": "4bit", "int8": "8bit", "fp8": "8bit"}
C = Config

#: kernel -> W's dtype class -> one Config per rank pad (RANK_PADS order), and the
#: fp32-factor variant (16-bit W only; None: the same tiles as W's own dtype).
#:   fwd      W/W' tiles with 16-byte column vectors; u/p operand tiles grow with rp
#:   bwd      g, W, t tiles, both dot-operand layouts of t, an (rp x BLOCK_C) fp32 dp
#:            accumulator in registers
#:   linear   16-bit W only: the GEMM's operand tiles pipelined through shared memory,
#:            the Lie epilogue holds u/p tiles and t
#:   grouped  sizes and strides come from a table (no constant strides): more registers
_TILES = {
    "fwd": {"fp32": ((C(32, 128, 8, 2), C(16, 64, 4, 2), C(16, 64, 4, 2), C(16, 32, 4, 2)),
                     None),
            "16bit": ((C(64, 128, 8, 2), C(64, 128, 8, 2), C(32, 128, 4, 2), C(16, 128, 4, 2)),
                      None)},
    "bwd": {"fp32": ((C(32, 64, 8, 1), C(16, 32, 4, 1), C(16, 32, 4, 1), C(16, 16, 4, 1)),
                     None),
            "16bit": ((C(64, 64, 4, 1), C(32, 64, 4, 1), C(32, 64, 4, 1), C(16, 32, 4, 1)),
                      (C(64, 64, 4, 1), C(32, 64, 4, 1), C(32, 64, 4, 1), C(16, 16, 4, 1)))},
    "linear": {"16bit": ((C(64, 64, 4, 3, 32), C(64, 64, 4, 3, 32), C(32, 64, 4, 2, 32),
                          C(32, 32, 4, 2, 32)),
                         (C(64, 64, 4, 3, 32), C(64, 64, 4, 3, 32), C(32, 32, 4, 2, 32),
                          C(16, 32, 4, 2, 32)))},
    "grouped": {"fp32": ((C(16, 64, 4, 2), C(16, 64, 4, 2), C(16, 32, 8, 2), C(16, 32, 8, 2)),
                         None),
                "16bit": ((C(32, 128, 8, 2), C(32, 128, 8, 2), C(16, 128, 4, 2),
                           C(16, 128, 4, 2)), None)},
}

#: Where a quantized W takes other tiles than a dense W of its compute dtype: (W format,
#: kernel, dtype class, rank pad, fp32 factors) -> Config. A 4-bit tile wants 32 elements
#: a thread (16 packed bytes: one 128-bit load), an 8-bit one 16, where the registers
#: allow; elsewhere the dense tiles fit and narrower loads remain (the backward at rank pad
#: 128, fp32 compute past rank pad 16: there the rank contractions, not W's bytes, bound
#: the time). The grouped kernel reads dense W only.
_QUANTIZED_TILES = {
    ("4bit", "fwd", "fp32", 16, False): C(64, 64, 4, 2),
    ("4bit", "fwd", "16bit", 128, False): C(64, 64, 4, 2),
    # both formats: the dequantization's registers on top of the dense tile's spilled
    **{(w_format, kernel, cls, rp, False): tile for w_format in W_FORMATS[1:]
       for kernel, cls, rp, tile in (("fwd", "fp32", 64, C(16, 32, 4, 2)),
                                     ("bwd", "fp32", 16, C(32, 64, 4, 1)),
                                     ("bwd", "fp32", 64, C(16, 16, 4, 1)),
                                     ("bwd", "16bit", 128, C(16, 16, 4, 1)))},
}


def _table() -> Dict[Tuple[str, str, int, bool, str], Config]:
    out = {}
    for kernel, by_class in _TILES.items():
        for dtype in DTYPES:
            cls = "fp32" if dtype == "fp32" else "16bit"
            if cls not in by_class:
                continue
            own, fp32_factors = by_class[cls]
            for i, rp in enumerate(RANK_PADS):
                for f32 in (False, True) if cls == "16bit" else (False,):
                    tile = (fp32_factors or own)[i] if f32 else own[i]
                    out[kernel, dtype, rp, f32, "dense"] = tile
                    for w_format in W_FORMATS[1:] if kernel != "grouped" else ():
                        out[kernel, dtype, rp, f32, w_format] = _QUANTIZED_TILES.get(
                            (w_format, kernel, cls, rp, f32), tile)
    return out


#: (kernel, W's compute dtype name, rank pad, fp32 factors over a 16-bit W, W format)
#: -> Config
CONFIGS = _table()


def config(kernel: str, dtype: str, rank_pad: int, fp32_factors: bool = False,
           w_format: str = "dense") -> Config:
    """The tiles of ``kernel`` for W of ``dtype`` ("fp32" | "fp16" | "bf16") at ``rank_pad``,
    stored as ``w_format`` (``W_FORMATS``)."""
    key = (kernel, dtype, rank_pad, fp32_factors and dtype != "fp32", w_format)
    if key not in CONFIGS:
        raise KeyError(f"no Triton tile config for kernel={kernel!r}, dtype={dtype!r}, "
                       f"rank_pad={rank_pad}, fp32_factors={fp32_factors}, "
                       f"w_format={w_format!r}")
    return CONFIGS[key]
