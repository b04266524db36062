"""What the weight op, the layer op and the many-layer op share: backend resolution from
an encoded order, the error texts of the unsupported autograd modes, the autocast guard."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..backends import Backend, select_backend
from ..order import decode_order

DOUBLE_BACKWARD = ("lie_kernels: the fused op has a first-order backward only; double "
                   "backward (create_graph=True, higher-order grads) is not supported. For "
                   "second derivatives use lie_kernels.reference.lie_weight_ref (plain autograd)")
FORWARD_AD = ("lie_kernels: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is "
              "not supported by the fused op; use lie_kernels.reference.lie_weight_ref")


def resolve_backend(name: str, weight: Tensor, u: Tensor, p: Tensor, code: int) -> Backend:
    """The backend for these inputs, ``code`` being ``encode_order(order)``. Same inputs,
    same choice: forward and backward resolve ``"auto"`` identically."""
    return select_backend(name, weight, u, p, decode_order(code))


def no_double_backward(*_):
    """The autograd formula of a backward custom op: there is none."""
    raise NotImplementedError(DOUBLE_BACKWARD)


def check_no_double_backward() -> None:
    """Called first in every backward: backward itself being recorded means
    ``create_graph=True``, which the fused backward cannot serve."""
    if torch.is_grad_enabled():
        raise NotImplementedError(DOUBLE_BACKWARD)


def without_autocast(device: torch.device):
    """Autocast off around a backward's math: an autocast region around ``backward()``
    would run the backends' out-of-place GEMMs in 16 bits and cut fp32 factor gradients
    to ~3e-3 relative error. A no-op context when autocast is off (the usual case)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
