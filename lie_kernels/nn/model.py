"""Model-level helpers: inject Lie layers, merge/unmerge or unload them, count parameters."""
from __future__ import annotations

import re
from typing import (Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import torch
from torch import Tensor, nn

from ..multi import lie_gemm_many

from .layers import LAYER_TYPES, LieLayer, lie_type_for

Target = Union[str, type]
Targets = Optional[Union[Target, Iterable[Target]]]

#: layer types whose forward reads a child Linear's ``.weight``/``.bias`` instead of
#: calling it: ``inject`` hooks them so the child's ``.weight`` is ``W'`` while they run
DIRECT_READERS = (nn.MultiheadAttention,)
_SUPPORTED = "Linear, Conv1d, Conv2d, Conv3d and their subclasses that keep the base forward"


def _entries(arg: str, targets, *, adaptable: bool) -> Tuple[List[str], tuple]:
    """Split ``targets`` (a name pattern, a type, or a list of them) into names and types."""
    items = [targets] if isinstance(targets, (str, type)) else list(targets)
    for t in items:
        if not isinstance(t, str) and not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"{arg} entries must be name patterns (str) or nn.Module types, "
                            f"got {type(t).__name__} {t!r}")
        if adaptable and isinstance(t, type) and not (
                any(issubclass(t, b) and t.forward is b.forward for b in LAYER_TYPES)):
            raise TypeError(f"{arg}: cannot adapt layer type {t.__name__}; supported: "
                            f"{_SUPPORTED}")
    return ([t for t in items if isinstance(t, str)],
            tuple(t for t in items if isinstance(t, type)))


def _name_match(pattern: str, name: str) -> Optional[str]:
    """"exact" (the full name), "pattern" (dotted suffix or regex full match) or None."""
    if name == pattern:
        return "exact"
    if name.endswith("." + pattern) or re.fullmatch(pattern, name):
        return "pattern"
    return None


def _why_not(mod: nn.Module) -> str:
    base = next((b for b in LAYER_TYPES if isinstance(mod, b)), None)
    if base is not None:
        return (f"{type(mod).__name__}, a {base.__name__} subclass with its own forward "
                f"(a Lie layer would bypass it)")
    return type(mod).__name__


def _find_targets(model: nn.Module, target_modules: Targets):
    """``(targets, already_adapted, refused)``: layers to wrap, Lie layers the targets
    name again, and matched modules that cannot be wrapped (name, reason)."""
    names, types = ([], ()) if target_modules is None else _entries(
        "target_modules", target_modules, adaptable=True)
    targets, adapted, refused, inside = [], [], [], []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue  # a Lie layer's own base layer
        if isinstance(mod, LieLayer):
            inside.append(name)
            mod = mod.base
        kinds = {_name_match(n, name) for n in names} - {None}
        hit = (target_modules is None or bool(kinds)
               or (bool(types) and isinstance(mod, types)))
        if not hit:
            continue
        if name in inside:
            adapted.append(name)
        elif lie_type_for(mod) is not None:
            targets.append((name, mod))
        elif "exact" in kinds:
            raise TypeError(f"inject: module {name!r} is a {_why_not(mod)}; supported "
                            f"layers: {_SUPPORTED}")
        elif isinstance(mod, tuple(LAYER_TYPES)) or (names and not next(mod.children(), None)):
            refused.append((name, _why_not(mod)))  # leaves only: ".*" matches containers
    return targets, adapted, refused


def _listing(pairs, limit: int = 6) -> str:
    shown = ", ".join(f"{n!r} ({why})" for n, why in pairs[:limit])
    return shown + (f", ... ({len(pairs)} in all)" if len(pairs) > limit else "")


def _no_match_error(model: nn.Module, target_modules: Targets, adapted, refused):
    head = f"inject: no module of {type(model).__name__} matches " \
           f"target_modules={target_modules!r}"
    if adapted:
        return ValueError(
            f"{head} that is not already a Lie layer ({len(adapted)} are: "
            f"{', '.join(map(repr, adapted[:6]))}{', ...' if len(adapted) > 6 else ''}); "
            f"inject never adapts a layer twice. To adapt again with another config, "
            f"call lk.unload(model) first (it merges the current update) or start from "
            f"a fresh model")
    why = [f"{head}."]
    if refused:
        why.append(f"Matched but not adaptable: {_listing(refused)}.")
    found, _, _ = _find_targets(model, None)
    why.append(f"Adaptable layers in the model: "
               f"{_listing([(n, type(m).__name__) for n, m in found])}." if found else
               f"The model has no adaptable layer left ({_SUPPORTED}).")
    return ValueError(" ".join(why))


def _expose_adapted(module: nn.Module, args) -> None:
    """Forward pre-hook of a ``DIRECT_READERS`` module: its Lie children's ``.weight``
    becomes ``W'`` (differentiable) for the duration of its forward."""
    for child in module.children():
        if isinstance(child, LieLayer) and not child.merged:
            child._exposed_weight = child.adapted_weight()


def _hide_adapted(module: nn.Module, args, output) -> None:
    for child in module.children():
        if isinstance(child, LieLayer):
            child._exposed_weight = None


def _hook_direct_readers(model: nn.Module) -> None:
    for mod in model.modules():
        if (isinstance(mod, DIRECT_READERS)
                and any(isinstance(c, LieLayer) for c in mod.children())
                and _expose_adapted not in mod._forward_pre_hooks.values()):
            mod.register_forward_pre_hook(_expose_adapted)
            mod.register_forward_hook(_hide_adapted, always_call=True)


def _unhook_direct_readers(model: nn.Module) -> None:
    for mod in model.modules():
        for hooks, fn in ((mod._forward_pre_hooks, _expose_adapted),
                          (mod._forward_hooks, _hide_adapted)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                mod._forward_hooks_always_called.pop(key, None)


def _freeze(model: nn.Module, trainable: Targets) -> None:
    """Freeze every parameter except the Lie factors and those of ``trainable`` modules."""
    factors = {id(p) for _, m in lie_layers(model) for p in m.parameters(recurse=False)}
    keep = set()
    if trainable is not None:
        names, types = _entries("trainable", trainable, adaptable=False)
        frozen_bases = {id(p) for _, m in lie_layers(model) for p in m.base.parameters()}
        for n in names:
            hits = [m for name, m in model.named_modules() if name and _name_match(n, name)]
            if not hits:
                raise ValueError(f"trainable: {n!r} matches no module of "
                                 f"{type(model).__name__} (names, dotted suffixes or "
                                 f"regexes of module names)")
            keep.update(id(p) for m in hits for p in m.parameters())
        for t in types:
            hits = [m for m in model.modules() if isinstance(m, t)]
            if not hits:
                raise ValueError(f"trainable: {type(model).__name__} has no {t.__name__}")
            keep.update(id(p) for m in hits for p in m.parameters())
        keep -= frozen_bases  # an adapted layer's W and bias stay frozen
    for p in model.parameters():
        if id(p) not in factors:
            p.requires_grad_(id(p) in keep)


def inject(model: nn.Module, target_modules: Targets = None, *, trainable: Targets = None,
           **config) -> nn.Module:
    """Replace matching layers with Lie layers, in place, and freeze the rest; returns ``model``.

    ``target_modules``: a name (``"layer1.0.conv1"``), a dotted suffix
    (``"conv1"``), a regex matched against the full name, a layer type
    (``nn.Conv2d``), or a list of these; None adapts every supported layer. Patterns
    and types pick only supported layers (Linear/Conv1d/2d/3d and subclasses that keep
    their forward); naming an unsupported module exactly is an error.
    ``config`` goes to each layer (``rank`` or ``r``, ``parametrization``, ``order``,
    ``alpha``/``scale``, ``backend``).

    Like PEFT, every parameter that is not a Lie factor is then frozen, except those of
    the modules ``trainable`` names (same forms as ``target_modules``, any module type:
    a new head, ``nn.LayerNorm``; PEFT's ``modules_to_save``). Layers that already are
    Lie layers are left as they are; a call that finds nothing new to adapt raises.
    A ``DIRECT_READERS`` module (``nn.MultiheadAttention``) reads its ``out_proj``'s
    ``.weight`` instead of calling it: it gets hooks that expose ``W'`` there.
    """
    targets, adapted, refused = _find_targets(model, target_modules)
    if not targets:
        raise _no_match_error(model, target_modules, adapted, refused)
    # build every layer before replacing any: a bad config leaves the model's layout alone
    wrapped = [(name, lie_type_for(mod)(mod, **config)) for name, mod in targets]
    for name, lie in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lie)
    _hook_direct_readers(model)
    _freeze(model, trainable)
    return model


def lie_layers(model: nn.Module) -> Iterator[Tuple[str, LieLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LieLayer))


def merge(model: nn.Module) -> nn.Module:
    """Merge every Lie layer not merged yet: ``W ← W ⊙ exp_K(sΔ)``.

    All or nothing: every layer is checked (tied weights, a merge that unmerge could
    not undo) before any weight is written, so an error leaves the model as it was.
    Layers whose weight is tied (one Parameter in several Lie layers) are refused:
    one merged weight cannot hold two updates.
    """
    layers = list(lie_layers(model))
    todo = [(n, m) for n, m in layers if not m.merged]
    sharing: Dict[int, List[str]] = {}
    for n, m in layers:
        sharing.setdefault(id(m.base.weight), []).append(n or type(m).__name__)
    for n, m in todo:
        names = sharing[id(m.base.weight)]
        if len(names) > 1:
            raise RuntimeError(f"merge: Lie layers {names} share one weight Parameter (tied "
                               f"weights); a merged weight can hold one update, not "
                               f"{len(names)}: keep the model unmerged or untie the weights")
    _all_or_nothing("merge", todo, LieLayer.merged_weight, LieLayer.merge)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` with the group inverse on every merged Lie layer (all or nothing)."""
    todo = [(n, m) for n, m in lie_layers(model) if m.merged]
    _all_or_nothing("unmerge", todo, LieLayer.check_unmerge, LieLayer.unmerge)
    return model


def _all_or_nothing(verb: str, todo, check, apply) -> None:
    """``check`` every layer (it raises on one that cannot be done), then ``apply`` to
    all: an error names the layer and leaves every weight as it was."""
    for n, m in todo:
        try:
            check(m)
        except (RuntimeError, ValueError) as exc:
            raise type(exc)(f"{verb}: layer {n!r}: {exc} (no layer was {verb}d)") from exc
    for _, m in todo:
        apply(m)


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
        # always_call: an exception in forward must not leave stale W' on the layers
        self._handles = [model.register_forward_pre_hook(self._build),
                         model.register_forward_hook(self._clear, always_call=True)]

    def _build(self, module, args):
        self._clear(module, args, None)
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


class ParameterCounts(NamedTuple):
    """Parameter counts of a model: ``trainable, adapter, base = counts``."""

    #: parameters with ``requires_grad`` (the adapter plus any ``trainable`` modules)
    trainable: int
    #: the Lie factors
    adapter: int
    #: every other parameter (the original model's)
    base: int

    @property
    def total(self) -> int:
        return self.adapter + self.base

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return (f"trainable {self.trainable:,} of {self.total:,} ({share:.2f}%): adapter "
                f"{self.adapter:,}, base {self.base:,}")


def trainable_parameters(model: nn.Module) -> ParameterCounts:
    """``ParameterCounts(trainable, adapter, base)``; ``.total`` is ``adapter + base``.

    Shared parameters count once."""
    factors = {id(p) for _, m in lie_layers(model) for p in m.parameters(recurse=False)}
    trainable = adapter = base = 0
    for p in model.parameters():
        trainable += p.numel() if p.requires_grad else 0
        if id(p) in factors:
            adapter += p.numel()
        else:
            base += p.numel()
    return ParameterCounts(trainable, adapter, base)


def unload(model: nn.Module) -> nn.Module:
    """Fold every Lie layer into its weight and put the wrapped layer back; returns ``model``.

    Each unmerged layer's W becomes the very ``W'`` its forward computes (same backend,
    same rounding); a merged layer's W already is. The model then has its original
    architecture and ``state_dict`` keys: it loads into a model built without
    lie_kernels (``strict=True``). ``batch_builds`` and ``nn.MultiheadAttention`` hooks
    are removed. Parameters keep their ``requires_grad`` (adapted W and bias stay
    frozen): ``model.requires_grad_(True)`` to train everything again. Lie layers owned
    by PEFT's ``LieraLayer`` are left alone (use PEFT's ``merge_and_unload``).
    """
    if isinstance(model, LieLayer):
        _fold(model)
        return model.base
    for name, lie in list(lie_layers(model)):
        if "base" not in lie._modules:
            continue  # a PEFT LieraLayer adapter: PEFT owns its base layer
        _fold(lie)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lie.base)
    _unhook_direct_readers(model)
    for hook in list(model._forward_pre_hooks.values()):
        if isinstance(getattr(hook, "__self__", None), BatchBuilds):
            hook.__self__.remove()
    return model


@torch.no_grad()
def _fold(lie: LieLayer) -> None:
    if not lie.merged:
        lie.base.weight.copy_(lie.adapted_weight())


#: PEFT's name for the same operation
merge_and_unload = unload
