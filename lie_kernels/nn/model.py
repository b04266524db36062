"""Model-level helpers: inject Lie layers, merge/unmerge them, count parameters."""
from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ..multi import lie_gemm_many

from .layers import LAYER_TYPES, LieLayer

Target = Union[str, type]


def _matcher(target_modules):
    """Name patterns (exact name, dotted suffix, or regex full match) and/or layer types."""
    if target_modules is None:
        return lambda name, mod: type(mod) in LAYER_TYPES, True
    items = [target_modules] if isinstance(target_modules, (str, type)) else list(target_modules)
    for t in items:
        if not isinstance(t, (str, type)):
            raise TypeError(f"target_modules entries must be name patterns (str) or layer "
                            f"types, got {type(t).__name__} {t!r}")
        if isinstance(t, type) and t not in LAYER_TYPES:
            raise TypeError(f"target_modules: cannot adapt layer type {t.__name__}; supported: "
                            f"{', '.join(k.__name__ for k in LAYER_TYPES)}")
    names = [t for t in items if isinstance(t, str)]
    types = tuple(t for t in items if isinstance(t, type))

    def match(name, mod):
        if types and type(mod) in types:
            return True
        return any(name == n or name.endswith("." + n) or re.fullmatch(n, name) for n in names)
    return match, False


def inject(model: nn.Module, target_modules: Optional[Union[Target, Iterable[Target]]] = None,
           **config) -> nn.Module:
    """Replace matching layers with Lie layers, in place; returns ``model``.

    ``target_modules``: a name (``"layer1.0.conv1"``), a dotted suffix
    (``"conv1"``), a regex matched against the full name, a layer type
    (``nn.Conv2d``), or a list of these; None adapts every Linear/Conv1d/2d/3d.
    ``config`` goes to each layer (``rank``, ``parametrization``, ``order``,
    ``alpha``/``scale``, ``backend``). The wrapped layers' weight and bias are
    frozen; every other parameter keeps its ``requires_grad``.
    """
    match, by_default = _matcher(target_modules)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and not isinstance(mod, LieLayer) and match(name, mod)
               and not any(isinstance(p, LieLayer) for p in _parents(model, name))]
    if not targets:
        raise ValueError(f"inject: no module of {type(model).__name__} matches "
                         f"target_modules={target_modules!r}")
    for name, mod in targets:
        if type(mod) not in LAYER_TYPES:
            raise TypeError(f"inject: module {name!r} is a {type(mod).__name__}; supported "
                            f"layers: {', '.join(k.__name__ for k in LAYER_TYPES)}")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LAYER_TYPES[type(mod)](mod, **config))
    return model


def _parents(model: nn.Module, name: str):
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def lie_layers(model: nn.Module) -> Iterator[Tuple[str, LieLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LieLayer))


def merge(model: nn.Module) -> nn.Module:
    """Merge every Lie layer: ``W ← W ⊙ exp_K(sΔ)``."""
    for _, m in lie_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` exactly with the group inverse."""
    for _, m in lie_layers(model):
        m.unmerge()
    return model


def adapted_weights(layers: Sequence[LieLayer]) -> List[Tensor]:
    """Every layer's ``W'`` with one fused call per (order, backend, device, dtype) group."""
    groups: Dict[tuple, List[int]] = {}
    for i, m in enumerate(layers):
        w = m.base.weight
        groups.setdefault((m.order, m.backend, w.device, w.dtype), []).append(i)
    out: List[Optional[Tensor]] = [None] * len(layers)
    for (order, backend, _, _), idx in groups.items():
        ws, us, ps = zip(*(layers[i].gemm_args() for i in idx))
        built = lie_gemm_many(ws, us, ps, [layers[i].scale for i in idx], order, backend)
        for i, w in zip(idx, built):
            out[i] = w
    return out


class BatchBuilds:
    """Hooks that build all of a model's ``W'`` in one call before each forward."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in lie_layers(model)]
        self._handles = [model.register_forward_pre_hook(self._build),
                         model.register_forward_hook(self._clear)]

    def _build(self, module, args):
        live = [m for m in self.layers if not m.merged]
        for m, w in zip(live, adapted_weights(live)):
            m.prebuilt = w

    def _clear(self, module, args, output):
        for m in self.layers:
            m.prebuilt = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def batch_builds(model: nn.Module) -> BatchBuilds:
    """Build every Lie layer's weight in one call per forward (pays on a GPU, where small
    layers are launch-bound). ``.remove()`` on the result undoes it."""
    return BatchBuilds(model)


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
