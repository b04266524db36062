"""The series order: its public bound and its one encoding for kernels and op schemas.

``order`` is an int K >= 0 (``exp_K``, the truncated series) or None (the exact exp).
Kernels take it as a compile-time int and custom-op schemas have no ``Optional[int]``,
so both see ``encode_order(order)``: K itself, or ``EXACT`` (-1) for the exact exp. The
Triton kernels test ``ORDER == -1`` and the CUDA kernels ``kExact = -1``: the same code.
"""
from __future__ import annotations

from typing import Optional

#: the code of the exact exp (order=None) in kernels and op schemas
EXACT = -1

#: Highest finite series order a caller may ask for. The terms past order K sum to at most
#: |x|^(K+1)/(K+1)! / (1 - |x|/(K+2)); at K = 64 that is < 1e-32 for |x| <= 8 and
#: < 7e-7 for |x| <= 20 (under 2e-15 of e^x for x > 0): order 64 already is the exact
#: exp at working precision. The compiled kernels unroll fewer
#: (``backends.base.KERNEL_MAX_ORDER``); the torch backend takes every order.
MAX_ORDER = 64


def encode_order(order: Optional[int]) -> int:
    """The int a kernel or an op schema takes: K, or ``EXACT`` for None."""
    return EXACT if order is None else order


def decode_order(code: int) -> Optional[int]:
    """Inverse of ``encode_order``."""
    return None if code == EXACT else code


def derivative_code(order: Optional[int]) -> int:
    """The code of ``d/dx exp_K = exp_{K-1}`` (the exact exp is its own derivative);
    ``order`` >= 1 or None."""
    return EXACT if order is None else order - 1
