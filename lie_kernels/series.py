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

from .validation import check_order, compute_dtype

__all__ = ["compute_dtype", "exp_series", "exp_series_", "expm1_series_", "divide_out",
           "multiply_in"]


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


# -- the group action on a stored weight, and its exact inverse (merge / unmerge) ---------

def _ulp(w: Tensor) -> Tensor:
    """Spacing of ``w``'s dtype at each entry of ``w``, in fp64 (subnormal spacing near 0)."""
    fi = torch.finfo(w.dtype)
    _, ex = torch.frexp(w.double())  # |w| = m·2^ex, 0.5 <= m < 1
    return torch.ldexp(torch.full(w.shape, fi.eps, dtype=torch.float64, device=w.device),
                       ex - 1).clamp_min(fi.tiny * fi.eps)


def divide_out(merged: Tensor, e: Tensor) -> Tensor:
    """``merged / e`` in ``e``'s (fp32/fp64) dtype, cast to ``merged``'s; zeros stay 0."""
    restored = (merged.to(e.dtype) / e).to(merged.dtype)
    return torch.where(merged == 0, merged, restored)


def multiply_in(w: Tensor, e: Tensor, what: str = "exp_K(scale·Δ)", zero_hint: str = ""
                ) -> Tensor:
    """``W ⊙ e`` in ``e``'s dtype, cast to W's, refused unless ``divide_out`` gives W back.

    Every entry is checked the way unmerge will compute it (cast to W's dtype, divide
    by the same ``e``): it must come back within 1 ulp of W's dtype, inf and NaN
    included. Entries that overflow to inf, underflow below the smallest normal number
    or hit ``e == 0`` would be lost for good, so the merge is refused with their count.
    """
    merged = (w.to(e.dtype) * e).to(w.dtype)
    back = divide_out(merged, e)
    ok = (back == w) | (back.double() - w.double()).abs().le(_ulp(w)) | (w.isnan() & back.isnan())
    if not bool(ok.all()):
        bad = ~ok
        fi = torch.finfo(w.dtype)
        over = int((bad & merged.isinf()).sum())
        zero = int((bad & (e == 0)).sum())
        under = int((bad & (merged.abs() < fi.tiny) & (e != 0)).sum())
        raise ValueError(
            f"cannot merge exactly: {int(bad.sum())} of {w.numel()} entries of the {w.dtype} "
            f"weight would not come back within 1 ulp on unmerge ({over} overflow to inf, "
            f"{under} underflow below {fi.tiny:.3g}, {zero} where {what} is 0; it ranges over "
            f"[{e.min().item():.4g}, {e.max().item():.4g}]). The weight is left unchanged; "
            f"keep the layer unmerged, make the update smaller, or merge a float32 copy"
            + (zero_hint if zero else ""))
    return merged
