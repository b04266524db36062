"""CUDA backend: the hand-written kernels of ``csrc/`` behind the Backend contract.

The extension comes from ``LIE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation
-e .`` (``lie_kernels/_C*.so``) or from a JIT build (``python -m
lie_kernels.cuda_build``, or ``LIE_KERNELS_JIT=1`` to build on first use).
Loading registers ``torch.ops.lie_kernels_cuda.{forward,backward,backward_splits}``
plus fake implementations, so ``torch.compile`` sees shapes.

Layout: the kernels walk W's rows in memory order (``base.weight_rows``). For
``channels_last`` or any other dense permutation, W reaches them as an ``(R, M)``
view (no copy) with p's columns permuted to match (p is tiny); the ops return W'
and dW as contiguous ``(R, M)`` in that order, seen back as W-shaped views in W's
own layout (``base.rows_to_weight``), and dp is permuted back.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..order import encode_order
from .base import (Backend, columns_from_order, kernel_limits, order_zero_backward,
                   rows_in_order, rows_to_weight, weight_rows)

MAX_RANK = 32  # csrc/lie_launch.h: kMaxRank
BUILD_HINT = ("build it with `LIE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
              "or `python -m lie_kernels.cuda_build` (needs nvcc and a CUDA build of torch)")

_STATE = {"ops": None, "error": None}


def _register_fakes() -> None:
    @torch.library.register_fake("lie_kernels_cuda::forward")
    def _(weight, u, p, order, scale):
        return weight.new_empty(weight.shape)

    @torch.library.register_fake("lie_kernels_cuda::backward")
    def _(grad, weight, u, p, order, scale, need_dw):
        return (weight.new_empty(weight.shape if need_dw else (0,)), u.new_empty(u.shape),
                p.new_empty(p.shape))


def load(build: bool = False):
    """``torch.ops.lie_kernels_cuda`` once the extension is loaded, else None (see ``error``)."""
    if _STATE["ops"] is not None or (_STATE["error"] and not build):
        return _STATE["ops"]
    from .. import cuda_build
    try:
        spec = importlib.util.find_spec("lie_kernels._C")
        lib = spec.origin if spec is not None else cuda_build.built_library()
        if lib is not None:
            torch.ops.load_library(str(lib))
        elif build or os.environ.get("LIE_KERNELS_JIT") == "1":
            cuda_build.build()
        else:
            raise RuntimeError(f"the CUDA extension is not built; {BUILD_HINT}")
        _register_fakes()
        _STATE["ops"], _STATE["error"] = torch.ops.lie_kernels_cuda, None
    except (OSError, RuntimeError, ImportError) as exc:
        _STATE["error"] = str(exc).splitlines()[0]
    return _STATE["ops"]


class CudaBackend(Backend):
    name = "cuda"
    priority = 10  # the reference implementation, below Triton (roofline: docs/cuda.md)

    def availability(self) -> Tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, (f"no CUDA device (the extension still builds here; {BUILD_HINT})")
        if load() is None:
            return False, _STATE["error"]
        return True, f"CUDA extension on {torch.cuda.get_device_name()}"

    def auto_priority(self, weight: Tensor) -> Optional[int]:
        return self.priority if weight.is_cuda else None

    def not_supported_reasons(self, weight, u, p, order) -> list:
        reasons = []
        if not weight.is_cuda:
            reasons.append(f"needs CUDA tensors, got {weight.device}")
        return reasons + kernel_limits(weight, u, order, MAX_RANK)

    def forward(self, weight, u, p, order, scale) -> Tensor:
        w2, pm, perm = weight_rows(weight, p)
        out = load().forward(w2, u, pm, encode_order(order), float(scale))
        return rows_to_weight(out, weight.shape, perm)

    def backward(self, grad, weight, u, p, order, scale, need_dw, overwrite_grad=False):
        if order == 0:
            return order_zero_backward(grad, weight, u, p, need_dw)
        w2, pm, perm = weight_rows(weight, p)
        g2 = rows_in_order(grad, perm)
        dw, du, dp = load().backward(g2, w2, u, pm, encode_order(order), float(scale), need_dw)
        return ((rows_to_weight(dw, weight.shape, perm) if need_dw else None), du,
                columns_from_order(dp, weight.shape, perm))


BACKEND = CudaBackend()
