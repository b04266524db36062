"""``inject``: swap Lie layers into a model (targets by name, regex or type), freeze the
rest, and hook the modules that read a child's ``.weight`` directly."""
from __future__ import annotations

import inspect
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from ..quant import bnb_linear_type
from .layers import LAYER_TYPES, LieLayer, lie_type_for
from .model import lie_layers
from .ties import warn_tied


Target = Union[str, type]


Targets = Optional[Union[Target, Iterable[Target]]]


#: module types whose forward reads a descendant layer's ``.weight`` instead of calling it,
#: with the paths of those descendants: ``inject`` hooks them so that, while they run, an
#: adapted descendant's ``.weight`` is ``W'`` (in the running thread only).
#: ``MultiheadAttention.in_proj_weight`` is a Parameter, not a layer: it is never adapted.
DIRECT_READERS: Dict[type, Tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    # the eval fast path, torch._transformer_encoder_layer_fwd, takes all three weights
    nn.TransformerEncoderLayer: ("self_attn.out_proj", "linear1", "linear2"),
    # it checks them on its first layer before it turns a padded batch into a nested
    # tensor, which MultiheadAttention then refuses when W' requires grad
    nn.TransformerEncoder: ("layers.0.self_attn.out_proj", "layers.0.linear1",
                            "layers.0.linear2"),
}


_SUPPORTED = ("Linear, Conv1d, Conv2d, Conv3d and their subclasses that keep the base forward, "
              "and bitsandbytes' Linear4bit/Linear8bitLt")


#: the layer options ``inject`` passes on (``LieLayer``'s keyword arguments)
_OPTIONS = tuple(inspect.signature(LieLayer.__init__).parameters)[2:]


def _entries(arg: str, targets, *, adaptable: bool) -> Tuple[List[str], tuple]:
    """Split ``targets`` (None, a name pattern, a type, or a list of them) into names and
    types, checking every entry: a valid regex, an nn.Module type (one inject can adapt)."""
    if targets is None:
        return [], ()
    if isinstance(targets, (str, type)):
        items = [targets]
    else:
        try:
            items = list(targets)
        except TypeError:
            raise TypeError(f"{arg} must be a name pattern (str), an nn.Module type or a "
                            f"list of them, got {type(targets).__name__} {targets!r}") from None
    for t in items:
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as exc:
                raise ValueError(f"{arg}: entry {t!r} is not a valid regex ({exc}); entries are "
                                 f"module names, dotted suffixes of them or regexes matched "
                                 f"against the full name") from None
        elif not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"{arg} entries must be name patterns (str) or nn.Module types, "
                            f"got {type(t).__name__} {t!r}")
        elif adaptable and not bnb_linear_type(t) and not any(
                issubclass(t, b) and t.forward is b.forward for b in LAYER_TYPES):
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


def _find_targets(model: nn.Module, names: List[str], types: tuple, everything: bool):
    """``(targets, already_adapted, refused)``: ``(paths, layer)`` to wrap, paths of Lie
    layers the targets name again, and matched modules that cannot be wrapped (path,
    reason). A module registered under several names (``self.a = self.b = layer``, a
    block repeated in a ModuleList) is one target with all its paths: it matches when any
    of them does, and one Lie layer replaces it at every one."""
    paths: Dict[int, List[str]] = {}
    modules: Dict[int, nn.Module] = {}
    bases = set()  # Lie layers' own base layers: never targets
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            paths.setdefault(id(mod), []).append(name)
            modules[id(mod)] = mod
        if isinstance(mod, LieLayer):
            bases.add(id(mod.base))
    targets, adapted, refused = [], [], []
    for key, mod in modules.items():
        if key in bases:
            continue
        where = paths[key]
        layer = mod.base if isinstance(mod, LieLayer) else mod
        kinds = {_name_match(n, p) for n in names for p in where} - {None}
        if not (everything or kinds or isinstance(layer, types)):
            continue
        if layer is not mod:
            adapted.append(where[0])
        elif lie_type_for(mod) is not None:
            targets.append((where, mod))
        elif "exact" in kinds:
            raise TypeError(f"inject: module {next(p for p in where if p in names)!r} is a "
                            f"{_why_not(mod)}; supported layers: {_SUPPORTED}")
        elif isinstance(mod, tuple(LAYER_TYPES)) or (names and not next(mod.children(), None)):
            refused.append((where[0], _why_not(mod)))  # leaves only: ".*" matches containers
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
    found, _, _ = _find_targets(model, [], (), True)
    why.append(f"Adaptable layers in the model: "
               f"{_listing([(n[0], type(m).__name__) for n, m in found])}." if found else
               f"The model has no adaptable layer left ({_SUPPORTED}).")
    return ValueError(" ".join(why))


def _read_layers(module: nn.Module) -> List[LieLayer]:
    """The Lie layers whose ``.weight`` a ``DIRECT_READERS`` module reads."""
    paths = next((p for t, p in DIRECT_READERS.items() if isinstance(module, t)), ())
    found = []
    for path in paths:
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layer, LieLayer):
            found.append(layer)
    return found


def _expose_adapted(module: nn.Module, args) -> None:
    """Forward pre-hook of a ``DIRECT_READERS`` module: the Lie layers it reads show ``W'``
    as ``.weight`` in this thread until its forward ends (built on first read)."""
    for layer in _read_layers(module):
        layer.expose()


def _conceal_adapted(module: nn.Module, args, output) -> None:
    for layer in _read_layers(module):
        layer.conceal()


def _hook_direct_readers(model: nn.Module) -> None:
    for mod in model.modules():
        if _read_layers(mod) and _expose_adapted not in mod._forward_pre_hooks.values():
            mod.register_forward_pre_hook(_expose_adapted)
            # always_call: a forward that raises must not leave W' exposed
            mod.register_forward_hook(_conceal_adapted, always_call=True)


def unhook_direct_readers(model: nn.Module) -> None:
    for mod in model.modules():
        for hooks, fn in ((mod._forward_pre_hooks, _expose_adapted),
                          (mod._forward_hooks, _conceal_adapted)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                mod._forward_hooks_always_called.pop(key, None)


def _kept(model: nn.Module, built: Dict[int, LieLayer], names: List[str], types: tuple) -> set:
    """ids of the parameters of the modules ``trainable`` names (``names``, ``types``), found
    in the model as it will be once each module of ``built`` (by id) is its Lie layer; an
    adapted layer's W and bias are never kept. Raises if an entry matches nothing."""
    modules = []
    for name, mod in model.named_modules(remove_duplicate=False):
        lie = built.get(id(mod))
        modules += [(name, mod)] if lie is None else [(name, lie), (f"{name}.base", mod)]
    keep = set()
    for n in names:
        hits = [m for name, m in modules if name and _name_match(n, name)]
        if not hits:
            raise ValueError(f"trainable: {n!r} matches no module of {type(model).__name__} "
                             f"(names, dotted suffixes or regexes of module names)")
        keep.update(id(p) for m in hits for p in m.parameters())
    for t in types:
        hits = [m for _, m in modules if isinstance(m, t)]
        if not hits:
            raise ValueError(f"trainable: {type(model).__name__} has no {t.__name__}")
        keep.update(id(p) for m in hits for p in m.parameters())
    return keep - {id(p) for _, m in modules if isinstance(m, LieLayer)
                   for p in m.base.parameters()}


def inject(model: nn.Module, target_modules: Targets = None, *, trainable: Targets = None,
           **config) -> nn.Module:
    """Replace matching layers with Lie layers, in place, and freeze the rest; returns ``model``.

    ``target_modules``: a name (``"layer1.0.conv1"``), a dotted suffix
    (``"conv1"``), a regex matched against the full name, a layer type
    (``nn.Conv2d``), or a list of these; None adapts every supported layer. Patterns
    and types pick only supported layers (Linear/Conv1d/2d/3d and subclasses that keep
    their forward); naming an unsupported module exactly is an error. A layer registered
    under several names (``self.a = self.b = layer``) gets one Lie layer, put at every
    name: each call site sees ``W'`` and merge/unload fold it once.
    ``config`` goes to each layer (``rank`` or ``r``, ``parametrization``, ``order``,
    ``alpha``/``scale``, ``backend``).

    Like PEFT, every parameter that is not a Lie factor is then frozen, except those of
    the modules ``trainable`` names (same forms as ``target_modules``, any module type:
    a new head, ``nn.LayerNorm``; PEFT's ``modules_to_save``). On a model that already
    has Lie layers, inject freezes only the W and bias of the layers it adds (and makes
    ``trainable`` trainable): what an earlier call kept trainable stays so. Layers that
    already are Lie layers are left as they are; a call that finds nothing new to adapt
    raises.

    All or nothing: every argument (targets, ``trainable``, the layer config for each
    layer) is checked before the model changes; an error leaves its modules, state and
    ``requires_grad`` flags as they were. Adapting a layer whose weight Parameter another
    module holds too (tied weights) warns: the model trains, merge and unload refuse it.
    A ``DIRECT_READERS`` module (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``)
    reads its children's ``.weight`` instead of calling them: it gets hooks that show
    ``W'`` there while it runs, in the running thread only.
    """
    if isinstance(model, LieLayer):
        raise TypeError(f"inject: the model is itself a {type(model).__name__}, a layer that "
                        f"is adapted already; inject adapts the layers inside a model")
    if lie_type_for(model) is not None:
        raise TypeError(f"inject: the model is itself a {type(model).__name__}; inject "
                        f"replaces layers inside a model and a bare layer has no parent to "
                        f"hold its Lie layer: wrap it directly, "
                        f"lk.nn.{lie_type_for(model).__name__}(layer, ...)")
    unknown = sorted(set(config) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"inject: unknown layer option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(_OPTIONS)}")
    names, types = _entries("target_modules", target_modules, adaptable=True)
    keep_names, keep_types = _entries("trainable", trainable, adaptable=False)
    targets, adapted, refused = _find_targets(model, names, types, target_modules is None)
    if not targets:
        raise _no_match_error(model, target_modules, adapted, refused)
    first = next(lie_layers(model), None) is None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # build every layer (each checks its config) before replacing any
        built = {id(mod): lie_type_for(mod)(mod, **config) for _, mod in targets}
        keep = _kept(model, built, keep_names, keep_types)
    except BaseException:
        for p, flag in flags:  # the layers built so far froze their W and bias
            p.requires_grad_(flag)
        raise
    warn_tied(model, targets)
    for where, mod in targets:
        for path in where:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, built[id(mod)])
    _hook_direct_readers(model)
    factors = {id(p) for lie in built.values() for p in lie.parameters(recurse=False)}
    for p in model.parameters():
        if id(p) in keep:
            p.requires_grad_(True)
        elif first and id(p) not in factors:
            p.requires_grad_(False)
    return model
