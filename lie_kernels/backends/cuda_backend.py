"""CUDA backend: the hand-written kernels of ``csrc/`` behind the Backend contract.

The extension comes from ``LIE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation
-e .`` (``lie_kernels/_C*.so``) or from a JIT build (``python -m
lie_kernels._cuda_build``, or ``LIE_KERNELS_JIT=1`` to build on first use).
Loading registers ``torch.ops.lie_kernels_cuda.{forward,backward}`` plus fake
implementations, so ``torch.compile`` sees shapes.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import Backend, kernel_limits, order_zero_backward

MAX_RANK = 32  # csrc/lie_kernels.cu: kMaxRank
MAX_ORDER = 8
BUILD_HINT = ("build it with `LIE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
              "or `python -m lie_kernels._cuda_build` (needs nvcc and a CUDA build of torch)")

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
    from .. import _cuda_build
    try:
        spec = importlib.util.find_spec("lie_kernels._C")
        lib = spec.origin if spec is not None else _cuda_build.built_library()
        if lib is not None:
            torch.ops.load_library(str(lib))
        elif build or os.environ.get("LIE_KERNELS_JIT") == "1":
            _cuda_build.build()
        else:
            raise RuntimeError(f"the CUDA extension is not built; {BUILD_HINT}")
        _register_fakes()
        _STATE["ops"], _STATE["error"] = torch.ops.lie_kernels_cuda, None
    except (OSError, RuntimeError, ImportError) as exc:
        _STATE["error"] = str(exc).splitlines()[0]
    return _STATE["ops"]


def _order(order: Optional[int]) -> int:
    return -1 if order is None else order


class CudaBackend(Backend):
    name = "cuda"
    priority = 10  # below Triton until GPU benchmarks say otherwise

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
        return reasons + kernel_limits(weight, u, order, MAX_ORDER, MAX_RANK)

    def forward(self, weight, u, p, order, scale) -> Tensor:
        return load().forward(weight, u, p, _order(order), float(scale))

    def backward(self, grad, weight, u, p, order, scale, need_dw):
        if order == 0:
            return order_zero_backward(grad, weight, u, p, need_dw)
        dw, du, dp = load().backward(grad, weight, u, p, _order(order), float(scale), need_dw)
        return (dw if need_dw else None), du, dp


BACKEND = CudaBackend()
