"""Input checks shared by the functional API, the layers and the backends.

Every error names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .order import MAX_ORDER
from .quant import QuantizedWeight

MIN_WEIGHT_DIM, MAX_WEIGHT_DIM = 2, 5
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float64, torch.float32, *LOW_PRECISION)


def check_order(order) -> Optional[int]:
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"order must be an int >= 0 or None (exact exp), got "
                        f"{type(order).__name__} {order!r}")
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int >= 0 and <= MAX_ORDER={MAX_ORDER} (higher "
                         f"orders equal the exact exp) or None (exact exp), got {order}")
    return int(order)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Series math runs in fp64 for fp64 inputs and in fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_scale(scale, name: str = "scale", dtype: Optional[torch.dtype] = None) -> float:
    """A finite real number; with W's ``dtype``, also one the compute dtype can hold
    (fp32 for fp32/fp16/bf16 W: torch refuses to turn a larger one into a scalar)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite real number, got {scale!r}")
    if dtype is not None:
        cd = compute_dtype(dtype)
        bound = torch.finfo(cd).max
        if abs(scale) > bound:
            raise ValueError(f"{name} must be at most {bound:g} in magnitude (the largest "
                             f"finite {cd}, the compute dtype of {dtype} weights), got "
                             f"{scale!r}")
    return float(scale)


def check_weight(weight, name: str = "weight") -> Tensor:
    """A dense floating-point W of 2 to 5 dims, or a ``QuantizedWeight`` (2-D, checked
    when it was built)."""
    if isinstance(weight, QuantizedWeight):
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: a quantized weight's compute dtype must be one of "
                            f"{FLOAT_DTYPES}, got {weight.dtype}")
        return weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a lie_kernels.quant."
                        f"QuantizedWeight, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp64/fp32/fp16/bf16), "
                        f"got dtype {weight.dtype}")
    if not MIN_WEIGHT_DIM <= weight.dim() <= MAX_WEIGHT_DIM:
        raise ValueError(f"{name} must have {MIN_WEIGHT_DIM} to {MAX_WEIGHT_DIM} dims "
                         f"(Linear, Conv1d/2d/3d), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    return weight




def factor_dtype_ok(factor_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """W's dtype, or fp32 with a 16-bit W (PEFT's default autocast keeps adapters in fp32;
    the math is fp32 inside anyway)."""
    return factor_dtype == weight_dtype or (factor_dtype == torch.float32
                                            and weight_dtype in LOW_PRECISION)


def check_factor(name: str, t, weight: Tensor, shape: Optional[tuple] = None,
                 ndim: Optional[int] = None, fp32_ok: bool = False) -> Tensor:
    """A factor must be a tensor on W's device with W's dtype (and the given shape).

    ``fp32_ok``: also accept an fp32 factor for a fp16/bf16 W (what the fused op takes).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (factor_dtype_ok(t.dtype, weight.dtype) if fp32_ok else t.dtype == weight.dtype):
        also = (" (or torch.float32)" if fp32_ok and weight.dtype in LOW_PRECISION else "")
        raise TypeError(f"{name} must have the weight's dtype {weight.dtype}{also}, "
                        f"got {t.dtype}")
    if t.device != weight.device:
        raise ValueError(f"{name} must be on the weight's device {weight.device}, "
                         f"got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t
