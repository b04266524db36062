"""Backend registry and selection.

Each backend says whether it is usable in this process at all
(``availability``) and, for given inputs, why it cannot take them
(``not_supported_reasons``). ``backend="auto"`` takes the usable backend with
the highest ``auto_priority`` for the inputs; naming a backend that cannot
take them raises an error that lists every reason.
"""
from __future__ import annotations

import importlib
import threading
from typing import Dict, Optional, Tuple

from torch import Tensor

from .base import Backend

#: modules that each define ``BACKEND``; imported lazily, in this order
_MODULES = ("torch_backend", "triton_backend", "cuda_backend")
_REGISTRY: Optional[Dict[str, Backend]] = None
_REGISTRY_LOCK = threading.Lock()
#: availability probes may load an extension or register ops on first call: one at a time
_PROBE_LOCK = threading.RLock()


def availability_of(be: Backend) -> Tuple[bool, str]:
    with _PROBE_LOCK:
        return be.availability()


def registry() -> Dict[str, Backend]:
    """The name -> backend map, built once. Thread-safe first use: the map is built
    whole under a lock and published only then, so no thread sees a partial one."""
    global _REGISTRY
    reg = _REGISTRY
    if reg is None:
        with _REGISTRY_LOCK:
            if _REGISTRY is None:
                built = {}
                for mod in _MODULES:
                    be = importlib.import_module(f"{__name__}.{mod}").BACKEND
                    built[be.name] = be
                _REGISTRY = built
            reg = _REGISTRY
    return reg


def get_backend(name: str) -> Backend:
    reg = registry()
    if name not in reg:
        raise ValueError(f"backend must be 'auto' or one of {sorted(reg)}, got {name!r}")
    return reg[name]


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (usable, reason)}`` for every known backend."""
    return {name: availability_of(be) for name, be in registry().items()}


def select_backend(name: str, weight: Tensor, u: Tensor, p: Tensor,
                   order: Optional[int]) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto":
        be = get_backend(name)
        usable, why = availability_of(be)
        reasons = [why] if not usable else be.not_supported_reasons(weight, u, p, order)
        if reasons:
            raise RuntimeError(f"backend {name!r} cannot take these inputs: "
                               + "; ".join(reasons))
        return be
    best, best_prio = None, None
    for be in registry().values():
        prio = be.auto_priority(weight)
        if prio is None or (best_prio is not None and prio <= best_prio):
            continue
        if availability_of(be)[0] and not be.not_supported_reasons(weight, u, p, order):
            best, best_prio = be, prio
    return best


def check_backend(backend) -> str:
    """A backend name that can run in this process: ``"auto"`` or a registered backend
    whose ``availability()`` is true (checked when a layer is built, not at its first
    forward). Whether it takes particular tensors is still checked per call."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or one of {sorted(registry())}), "
                        f"got {type(backend).__name__} {backend!r}")
    if backend == "auto":
        return backend
    usable, why = availability_of(get_backend(backend))
    if not usable:
        raise ValueError(f"backend={backend!r} cannot run in this process: {why}; "
                         f"use backend='auto' (or 'torch')")
    return backend
