"""Input checks shared by the functional API, the layers and the backends.

Every error names the argument, what was expected and what was given.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

MIN_WEIGHT_DIM, MAX_WEIGHT_DIM = 2, 5


def check_order(order) -> Optional[int]:
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"order must be an int >= 0 or None (exact exp), got "
                        f"{type(order).__name__} {order!r}")
    if order < 0:
        raise ValueError(f"order must be an int >= 0 or None (exact exp), got {order}")
    return int(order)


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
    return float(scale)


def check_weight(weight) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (fp64/fp32/fp16/bf16), "
                        f"got dtype {weight.dtype}")
    if not MIN_WEIGHT_DIM <= weight.dim() <= MAX_WEIGHT_DIM:
        raise ValueError(f"weight must have {MIN_WEIGHT_DIM} to {MAX_WEIGHT_DIM} dims "
                         f"(Linear, Conv1d/2d/3d), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    return weight


def check_factor(name: str, t, weight: Tensor, shape: Optional[tuple] = None,
                 ndim: Optional[int] = None) -> Tensor:
    """A factor must be a tensor on W's device with W's dtype (and the given shape)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != weight.dtype:
        raise TypeError(f"{name} must have the weight's dtype {weight.dtype}, got {t.dtype}")
    if t.device != weight.device:
        raise ValueError(f"{name} must be on the weight's device {weight.device}, "
                         f"got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t
