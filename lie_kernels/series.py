"""Truncated exponential series, the one piece of math every backend shares.

    exp_K(x)   = Σ_{k=0..K} x^k / k!          (K = None: the exact exp)
    expm1_K(x) = exp_K(x) - 1
    d/dx exp_K = exp_{K-1}                    (exp_{-1} = 0)

Both are evaluated with Horner's rule on the nested form

    S_m(x) = 1 + x/m · (1 + x/(m+1) · ( ... (1 + x/K)))
    exp_K  = S_1,      expm1_K = x · S_2

so an order-K series costs K fused multiply-adds per element. The Triton
kernel (``backends/triton_kernels.py``) and the CUDA header
(``csrc/lie_series.cuh``) evaluate exactly this nesting.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Series math runs in fp64 for fp64 inputs and in fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nested(x: Tensor, order: int, m: int, out: Optional[Tensor], scale: float = 1.0) -> Tensor:
    """S_m(scale·x) for ``order >= m``, into ``out`` when given (out may not alias x).

    The scale rides on the Horner coefficients, so ``scale·x`` is never formed.
    """
    one = torch.ones((), dtype=x.dtype, device=x.device)
    s = torch.add(one, x, alpha=scale / order, out=out)
    for k in range(order - 1, m - 1, -1):
        s = torch.addcmul(one, s, x, value=scale / k, out=out)
    return s


def exp_series(x: Tensor, order: Optional[int]) -> Tensor:
    """``exp_K(x) = Σ_{k=0..K} x^k/k!`` elementwise; ``order=None`` is the exact exp.

    Computed in at least fp32 (Horner), returned in ``x``'s dtype, and
    differentiable with respect to ``x`` (``d/dx exp_K = exp_{K-1}``).
    """
    from ._validate import check_order  # local: _validate imports nothing from here
    check_order(order)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"exp_series: x must be a floating-point tensor, got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    xc = x.to(compute_dtype(x.dtype))
    if order is None:
        y = torch.exp(xc)
    elif order == 0:
        y = torch.ones_like(xc)
    else:
        y = _nested(xc, order, 1, None)
    return y.to(x.dtype)


def exp_series_(x: Tensor, order: Optional[int], buf: Tensor, scale: float = 1.0) -> Tensor:
    """exp_K(scale·x) into ``buf`` (same shape as x); ``x`` is left intact. Returns ``buf``."""
    if order is None:
        return torch.exp(x if scale == 1.0 else torch.mul(x, scale, out=buf), out=buf)
    if order == 0:
        return buf.fill_(1.0)
    return _nested(x, order, 1, buf, scale)


def expm1_series_(x: Tensor, order: int, buf: Optional[Tensor], scale: float = 1.0
                  ) -> Tuple[Tensor, float]:
    """``(e, c)`` with ``expm1_K(scale·x) = c·e`` for an int order (the exact exp is
    ``W·exp`` directly, see the torch backend); ``x`` may be overwritten, ``e`` is x or buf.

    Returning the factor ``c`` lets the caller fold it into its own fused op.
    """
    if order == 0:
        return x.zero_(), 1.0
    if order == 1:
        return x, scale
    return _nested(x, order, 2, buf, scale).mul_(x), scale
