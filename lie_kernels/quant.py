"""Frozen base weights stored in 4 or 8 bits, read by the fused ops without a dense copy.

A ``QuantizedWeight`` describes ``deq(W)``, the weight the adapter multiplies::

    4-bit (nf4, fp4):  deq(W)[e] = code[q(e)] · absmax[e // blocksize]
    int8 (LLM.int8):   deq(W)[o, c] = (q[o, c] · SCB[o]) · (1/127)
    fp8 (e4m3fn):      deq(W)[o, c] = q[o, c] · row_scale[o]

where ``e = o·M + c`` is the row-major element index of the ``(R, M)`` weight, ``q(e)`` is
the e-th 4-bit code of the packed bytes (two per byte, the even element in the high
nibble: bitsandbytes' layout) and ``code`` its 16-entry table. The fused op computes
``W' = deq(W) ⊙ exp_K(s·Δ)`` in the compute dtype (``dtype``); a backend dequantizes a
block of rows at a time (or a tile in registers), never the whole weight. W is frozen: no
gradient reaches it. ``from_bnb`` reads bitsandbytes' ``Params4bit``/``Int8Params``
(nested absmax statistics are expanded to fp32 here: a tensor of numel/blocksize floats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

KINDS = ("nf4", "fp4", "int8", "fp8")
#: LLM.int8's step: int8 rows hold round(127·w/SCB); bitsandbytes multiplies by this
#: float after the row scale, and so do we (bitwise the same dequantization)
INT8_STEP = 7.874015718698502e-3
#: the byte layouts of each kind
STORAGE = {"nf4": torch.uint8, "fp4": torch.uint8, "int8": torch.int8,
           "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """``deq(W)`` of shape ``shape`` in ``dtype``, from ``data`` and fp32 ``scales``
    (absmax per block for 4-bit kinds, per row for int8 (``SCB``) and fp8); see the
    module docstring."""

    kind: str
    data: Tensor
    scales: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 0
    code: Optional[Tensor] = None
    #: a 4-bit weight read from bitsandbytes (``from_bnb``): its ``dequantize_4bit`` op
    #: reads these bytes, scales and (its own) code table
    from_bitsandbytes: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.data.dtype != STORAGE[self.kind]:
            raise TypeError(f"data of a {self.kind} weight must be {STORAGE[self.kind]}, "
                            f"got {self.data.dtype}")
        if len(self.shape) != 2:
            raise ValueError(f"a quantized weight must be 2-D (a Linear weight), got shape "
                             f"{tuple(self.shape)}")
        if self.scales.dtype != torch.float32:
            raise TypeError(f"scales must be float32, got {self.scales.dtype}")
        numel = self.shape[0] * self.shape[1]
        if self.packed:
            if self.blocksize < 2 or self.code is None or self.code.numel() != 16:
                raise ValueError(f"a {self.kind} weight needs a blocksize >= 2 and a "
                                 f"16-entry code, got blocksize={self.blocksize}, code "
                                 f"{None if self.code is None else tuple(self.code.shape)}")
            want = (-(-numel // 2), -(-numel // self.blocksize))
            got = (self.data.numel(), self.scales.numel())
        else:
            want, got = (numel, self.shape[0]), (self.data.numel(), self.scales.numel())
        if want != got:
            raise ValueError(f"a {self.kind} weight of shape {tuple(self.shape)} needs "
                             f"(data, scales) of {want} elements, got {got}")

    # -- the tensor-like surface the ops and backends read ------------------------------
    @property
    def packed(self) -> bool:
        """Two 4-bit codes per byte (nf4, fp4)."""
        return self.kind in ("nf4", "fp4")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    requires_grad = False

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # -- dequantization ----------------------------------------------------------------
    def block_rows(self, elems: int) -> int:
        """Rows to dequantize at a time for blocks of about ``elems`` elements: a multiple
        of the fewest rows that hold whole scale blocks (4-bit: ``blocksize / gcd(M,
        blocksize)``), so every block but the last is one call of bitsandbytes' kernel
        (a block that cuts a scale block takes the gather, ~4x slower: 1.66 against 0.40
        ms for a 512x1376 nf4 weight); at least that many."""
        cols = self.shape[1]
        align = self.blocksize // math.gcd(cols, self.blocksize) if self.packed else 1
        return max(1, elems // cols // align) * align

    def rows(self, r0: int, n: int, dtype: torch.dtype = torch.float32,
             out: Optional[Tensor] = None) -> Tensor:
        """``deq(W)[r0:r0+n]`` as an ``(n, M)`` tensor of ``dtype`` (into ``out`` if given,
        else a new tensor the caller may overwrite): computed in fp32, as bitsandbytes
        does, then cast."""
        cols = self.shape[1]
        if dtype != torch.float32:
            w = self.rows(r0, n)
            return w.to(dtype) if out is None else out.copy_(w)
        native = self._native_rows(r0, n) if self.packed else None
        if native is not None:
            return native if out is None else out.copy_(native)
        if out is None:
            out = torch.empty((n, cols), dtype=dtype, device=self.device)
        if not self.packed:
            # int8 codes promote to fp32 inside the multiply (the same products as
            # q.float() · SCB, without that copy); fp8 does not promote
            q = self.data.view(self.shape)[r0:r0 + n]
            out = torch.mul(q if self.kind == "int8" else q.to(torch.float32),
                            self.scales[r0:r0 + n, None], out=out)
            return out.mul_(INT8_STEP) if self.kind == "int8" else out
        e0, e1, bs = r0 * cols, (r0 + n) * cols, self.blocksize
        flat = out.view(-1)
        if e0 % 2 == 0 and e1 % 2 == 0:  # whole bytes: one gather of each byte's pair
            b = self.data.view(-1)[e0 // 2:e1 // 2]
            torch.index_select(self._pairs, 0, b.int(), out=flat.view(-1, 2))
        else:
            e = torch.arange(e0, e1, device=self.device)
            b = self.data.view(-1)[e // 2]
            torch.index_select(self.code, 0, torch.where(e % 2 == 0, b >> 4, b & 15).int(),
                               out=flat)
        if e0 % bs == 0 and e1 % bs == 0:  # whole blocks
            flat.view(-1, bs).mul_(self.scales[e0 // bs:e1 // bs, None])
        else:
            per = torch.repeat_interleave(self.scales[e0 // bs:(e1 - 1) // bs + 1], bs)
            flat.mul_(per[e0 % bs:e0 % bs + e1 - e0])
        return out

    def _native_rows(self, r0: int, n: int) -> Optional[Tensor]:
        """fp32 rows ``r0:r0+n`` from bitsandbytes' own kernel where it applies (a slice of
        whole blocks, an even count), else None. The slice is handed to it as one row:
        its CPU kernel misreads blocks that straddle rows, and a single row has none."""
        cols, bs = self.shape[1], self.blocksize
        e0, e1 = r0 * cols, (r0 + n) * cols
        if self._native_4bit is None or e0 % bs or e1 % bs or (e1 - e0) % 2:
            return None
        return self._native_4bit(self.data.view(-1)[e0 // 2:e1 // 2],
                                 self.scales[e0 // bs:e1 // bs], bs, self.kind,
                                 [1, e1 - e0], torch.float32).view(n, cols)

    @cached_property
    def _pairs(self) -> Tensor:
        """The codes of every byte value: row ``b`` is ``(code[b >> 4], code[b & 15])``
        (the even element in the high nibble), so a byte takes one gather, not two."""
        return torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)

    @cached_property
    def _native_4bit(self):
        """bitsandbytes' ``dequantize_4bit`` op (its native kernels, several times faster
        than a gather on CPU) for a weight ``from_bnb`` read, where this bitsandbytes
        registers it; else None."""
        if not self.from_bitsandbytes or not hasattr(torch.ops.bitsandbytes,
                                                     "dequantize_4bit"):
            return None
        return torch.ops.bitsandbytes.dequantize_4bit

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``deq(W)`` whole, in ``dtype`` (default: the compute dtype). For checks and
        merges: the fused ops read a block of rows at a time instead."""
        w = self.rows(0, self.shape[0])
        return w.to(dtype or self.dtype)


def _absmax(state) -> Tensor:
    """A 4-bit quant state's absmax in fp32, the nested (double-quantized) statistics
    expanded, ``code2[absmax_q] · absmax2[block of 256] + offset``, by bitsandbytes' own
    ``dequantize_blockwise`` (a Lie layer reads this on every forward: 34 µs for a
    1376x512 weight, against 94 µs indexing the code here)."""
    if not state.nested:
        return state.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise  # a nested state is bnb's
    return dequantize_blockwise(state.absmax, state.state2).float().add_(state.offset)


def from_bnb(weight, dtype: Optional[torch.dtype] = None,
             scb: Optional[Tensor] = None) -> QuantizedWeight:
    """The ``QuantizedWeight`` of a bitsandbytes ``Params4bit`` (nf4/fp4, nested or not,
    any blocksize) or a quantized ``Int8Params`` (int8 data with row scales ``SCB``: the
    weight's own, or ``scb``, where ``Linear8bitLt`` keeps them after its first forward).
    ``dtype``: the compute dtype (default: the 4-bit state's, fp32 for int8)."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("the 4-bit weight was repacked for bitsandbytes' CPU inference "
                             "kernel (its eval forward on an AVX512-BF16 CPU did that); "
                             "build the Lie layer before running the base model in eval")
        return QuantizedWeight(state.quant_type, weight.data.view(-1), _absmax(state),
                               torch.Size(state.shape), dtype or state.dtype,
                               int(state.blocksize), state.code.float().to(weight.device),
                               from_bitsandbytes=True)
    scb = getattr(weight, "SCB", None) if scb is None else scb
    if weight.dtype == torch.int8 and scb is not None:
        return QuantizedWeight("int8", weight.data, scb.float(), weight.shape,
                               dtype or torch.float32)
    raise TypeError(f"weight must be a quantized bitsandbytes Params4bit or Int8Params, got "
                    f"{type(weight).__name__} of dtype {weight.dtype} (a 4-bit weight is "
                    f"quantized when moved to its device; an Int8Params needs its SCB)")


#: the bitsandbytes Linear classes (and their subclasses) a Lie layer can wrap
BNB_LINEARS = ("Linear4bit", "Linear8bitLt")


def bnb_linear_type(t: type) -> bool:
    """Whether ``t`` is bitsandbytes' ``Linear4bit``/``Linear8bitLt`` or a subclass
    (``LinearNF4``, ``LinearFP4``), told by name: bitsandbytes need not be imported."""
    return any(c.__name__ in BNB_LINEARS and c.__module__.startswith("bitsandbytes")
               for c in t.__mro__)


def bnb_linear(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit``/``Linear8bitLt`` (told by its
    weight's class, so bitsandbytes need not be imported to ask)."""
    w = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Linear) and type(w).__name__ in ("Params4bit", "Int8Params")
            and type(w).__module__.startswith("bitsandbytes"))


def compute_dtype_of(module) -> torch.dtype:
    """The dtype a bitsandbytes Linear computes in: its ``compute_dtype`` (4-bit), else
    the original weight's (4-bit quant state) or the bias's (int8), else fp32."""
    dtype = getattr(module, "compute_dtype", None)
    state = getattr(module.weight, "quant_state", None)
    if dtype is None and state is not None:
        dtype = state.dtype
    if dtype is None and module.bias is not None:
        dtype = module.bias.dtype
    return dtype or torch.float32


def layer_weight(module):
    """The frozen W a Lie layer reads from ``module``: its ``QuantizedWeight`` for a
    bitsandbytes Linear (in the layer's compute dtype), else ``module.weight``."""
    if bnb_linear(module):
        state = getattr(module, "state", None)  # Linear8bitLt: SCB moves there when it runs
        return from_bnb(module.weight, compute_dtype_of(module), getattr(state, "SCB", None))
    return module.weight


@torch.no_grad()
def requantize(module, weight: Tensor) -> float:
    """Store ``weight`` (a dense W in the compute dtype) in bitsandbytes ``module``'s own
    format (4-bit: its quant type, blocksize and nested statistics; int8: row scales), as
    PEFT merges into bitsandbytes LoRA layers; returns the error that costs,
    ``max |deq(q(weight)) - weight| / max |weight|``."""
    import bitsandbytes as bnb  # only a bitsandbytes layer gets here
    old, device = module.weight, module.weight.device
    dense = weight.detach().to("cpu")
    state = getattr(old, "quant_state", None)
    if state is not None:
        new = bnb.nn.Params4bit(dense, requires_grad=False, quant_type=state.quant_type,
                                blocksize=state.blocksize, compress_statistics=state.nested,
                                quant_storage=old.quant_storage)
    else:
        new = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False)
        module.state.CB = module.state.SCB = None  # the old row scales go with the old rows
    module.weight = new.to(device)
    back = layer_weight(module).rows(0, weight.shape[0]).to(weight.device)
    return float((back - weight.float()).abs().max() / weight.float().abs().max().clamp_min(
        torch.finfo(torch.float32).tiny))
