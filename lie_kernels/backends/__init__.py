"""Backend registry and selection.

Each backend says whether it is usable in this process at all
(``availability``) and, for given inputs, why it cannot take them
(``not_supported_reasons``). ``backend="auto"`` takes the usable backend with
the highest ``auto_priority`` for the inputs; naming a backend that cannot
take them raises an error that lists every reason.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

from torch import Tensor

from .base import Backend

#: modules that each define ``BACKEND``; imported lazily, in this order
_MODULES = ("torch_backend", "triton_backend", "cuda_backend")
_REGISTRY: Dict[str, Backend] = {}


def _registry() -> Dict[str, Backend]:
    if not _REGISTRY:
        for mod in _MODULES:
            be = importlib.import_module(f"{__name__}.{mod}").BACKEND
            _REGISTRY[be.name] = be
    return _REGISTRY


def get_backend(name: str) -> Backend:
    reg = _registry()
    if name not in reg:
        raise ValueError(f"backend must be 'auto' or one of {sorted(reg)}, got {name!r}")
    return reg[name]


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (usable, reason)}`` for every known backend."""
    return {name: be.availability() for name, be in _registry().items()}


def select_backend(name: str, weight: Tensor, u: Tensor, p: Tensor,
                   order: Optional[int]) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto":
        be = get_backend(name)
        usable, why = be.availability()
        reasons = [why] if not usable else be.not_supported_reasons(weight, u, p, order)
        if reasons:
            raise RuntimeError(f"backend {name!r} cannot take these inputs: "
                               + "; ".join(reasons))
        return be
    best, best_prio = None, None
    for be in _registry().values():
        prio = be.auto_priority(weight)
        if prio is None or (best_prio is not None and prio <= best_prio):
            continue
        if be.availability()[0] and not be.not_supported_reasons(weight, u, p, order):
            best, best_prio = be, prio
    return best
