"""Tied weights: one Parameter held by several modules. ``inject`` warns about them;
``merge`` and ``unload`` refuse to fold an update into one."""
from __future__ import annotations

import warnings
from typing import Dict, List

from torch import nn

from .model import lie_layers


def _holders(model: nn.Module, lies: Dict[int, str]) -> Dict[int, Dict[int, str]]:
    """id(Parameter) -> {id(module): its path} for every module that holds it. ``lies``:
    id(base layer) -> path of the Lie layer (to be) wrapping it, the name it goes by."""
    held: Dict[int, Dict[int, str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                held.setdefault(id(p), {}).setdefault(id(mod), lies.get(id(mod), name))
    return held


def _and(items: List[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _ties(model: nn.Module, layers: Dict[int, nn.Module], lies: Dict[int, str]):
    """``([its name, then every other holder of its weight], [the plain holders])`` for each
    of ``layers`` (id -> base layer) whose weight Parameter another module holds too."""
    held = _holders(model, lies)
    types = {id(m): type(m).__name__ for m in model.modules()}
    seen = set()
    for key, layer in layers.items():
        holders = held.get(id(layer.weight), {})
        if len(holders) > 1 and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            names = [repr(holders[key])] + [repr(n) if k in lies else f"{n!r} ({types[k]})"
                                            for k, n in holders.items() if k != key]
            yield names, [repr(n) for k, n in holders.items() if k not in lies]


def refuse_tied(verb: str, model: nn.Module, todo) -> None:
    """Refuse to fold an update into a weight Parameter that another module holds too: a
    second Lie layer (one weight cannot hold two updates) or a plain module (it would
    read ``W'`` from then on)."""
    lies = {id(m.base): n or type(m).__name__ for n, m in lie_layers(model)}
    for names, plain in _ties(model, {id(m.base): m.base for _, m in todo}, lies):
        why = (f"folding {names[0]}'s update into it would change {_and(plain)} too" if plain
               else f"one weight can hold one update, not {len(names)}")
        raise RuntimeError(
            f"{verb}: {'Lie layer' if plain else 'Lie layers'} {_and(names)} share one weight "
            f"Parameter (tied weights); {why}: keep the model unmerged, or untie the weights "
            f"first (layer.base.weight = nn.Parameter(layer.base.weight.detach().clone())); "
            f"no layer was changed")


def warn_tied(model: nn.Module, targets) -> None:
    lies = {id(m.base): n or type(m).__name__ for n, m in lie_layers(model)}
    lies.update({id(mod): where[0] for where, mod in targets})
    for names, plain in _ties(model, {id(mod): mod for _, mod in targets}, lies):
        reads = (f"{_and(plain)} {'keeps' if len(plain) == 1 else 'keep'} reading W while "
                 f"{names[0]} reads W'" if plain else "each Lie layer trains its own update")
        warnings.warn(f"inject: {_and(names)} share one weight Parameter (tied weights): "
                      f"{reads}, so lk.merge and lk.unload will refuse to fold the update into "
                      f"it; untie the weights before inject to be able to merge", stacklevel=3)
