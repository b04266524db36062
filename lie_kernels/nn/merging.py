"""Folding updates into weights: ``merge``/``unmerge`` (the group action and its inverse,
all or nothing) and ``unload`` (back to the plain layers)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..quant import requantize
from .layers import LieLayer
from .injection import unhook_direct_readers
from .model import BatchBuilds, lie_layers
from .ties import refuse_tied


def merge(model: nn.Module) -> nn.Module:
    """Merge every Lie layer not merged yet: ``W ← W ⊙ exp_K(sΔ)``.

    All or nothing: every layer is checked (tied weights, a merge that unmerge could
    not undo) before any weight is written, so an error leaves the model as it was.
    A weight Parameter that another module holds too (tied weights) is refused: a second
    Lie layer's (one merged weight cannot hold two updates) or a plain module's (it
    would read ``W'`` from then on).
    """
    todo = [(n, m) for n, m in lie_layers(model) if not m.merged]
    refuse_tied("merge", model, todo)
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


QUANTIZED_UNLOAD = ("refuse", "dequantize", "requantize")


def unload(model: nn.Module, *, quantized: str = "refuse") -> nn.Module:
    """Fold every Lie layer into its weight and put the wrapped layer back; returns ``model``.

    Each unmerged layer's W becomes the very ``W'`` its forward computes (same backend,
    same rounding); a merged layer's W already is. The model then has its original
    architecture and ``state_dict`` keys: it loads into a model built without
    lie_kernels (``strict=True``); a Lie layer registered under several names goes back
    at each. ``batch_builds`` and ``DIRECT_READERS`` hooks are removed. Parameters keep
    their ``requires_grad`` (adapted W and bias stay frozen): ``model.requires_grad_(True)``
    to train everything again. Like ``merge``, all or nothing: a weight Parameter another
    module holds too (tied weights) is refused, the model left as it was. Lie layers owned
    by PEFT's ``LieraLayer`` are left alone (use PEFT's ``merge_and_unload``).

    A layer on a quantized base (bitsandbytes 4/8-bit) cannot hold W' exactly:
    ``quantized="refuse"`` (default) raises, naming those layers; ``"dequantize"`` puts
    back a dense ``nn.Linear`` holding W' in the compute dtype (exact, and as large as a
    dense layer); ``"requantize"`` quantizes W' into the base's own format, as PEFT does
    for bitsandbytes LoRA, and warns with the error it measured (lossy).
    """
    if quantized not in QUANTIZED_UNLOAD:
        raise ValueError(f"unload: quantized must be one of {QUANTIZED_UNLOAD}, got "
                         f"{quantized!r}")
    if isinstance(model, LieLayer):
        _refuse_quantized([("", model)], quantized)
        return _fold(model, quantized)
    # a PEFT LieraLayer adapter has no registered base: PEFT owns its base layer
    refuse_tied("unload", model, [(n, m) for n, m in lie_layers(model)
                                   if "base" in m._modules and not m.merged])
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, LieLayer) and "base" in m._modules]
    _refuse_quantized(found, quantized)
    # an alias appears once per name: fold each layer once
    plain = {key: _fold(m, quantized) for key, m in {id(m): m for _, m in found}.items()}
    for name, lie in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                plain[id(lie)])
    unhook_direct_readers(model)
    for hook in list(model._forward_pre_hooks.values()):
        if isinstance(getattr(hook, "__self__", None), BatchBuilds):
            hook.__self__.remove()
    return model


def _refuse_quantized(found, quantized: str) -> None:
    names = sorted({n or type(m).__name__ for n, m in found if m.quantized})
    if names and quantized == "refuse":
        raise ValueError(
            f"unload: Lie layers {names} wrap quantized (bitsandbytes) layers, whose k-bit "
            f"weight cannot hold W' exactly; pass quantized='dequantize' (dense nn.Linear "
            f"layers holding W' exactly) or quantized='requantize' (the same k-bit layers, "
            f"W' requantized: lossy, as PEFT merges bitsandbytes LoRA); no layer was changed")


@torch.no_grad()
def _fold(lie: LieLayer, quantized: str) -> nn.Module:
    """The plain module that replaces ``lie``: its base holding W'."""
    if not lie.quantized:
        if not lie.merged:
            lie.base.weight.copy_(lie.adapted_weight())
        return lie.base
    w1 = lie.adapted_weight()
    if quantized == "dequantize":
        return _dense_linear(lie.base, w1)
    err = requantize(lie.base, w1)
    warnings.warn(f"unload: W' requantized into {type(lie.base).__name__}: max |error| "
                  f"{err:.3g} of max |W'| (quantized='dequantize' keeps it exact)")
    return lie.base


def _dense_linear(base: nn.Module, weight: Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` (and ``base``'s bias, in its dtype)."""
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                    dtype=weight.dtype, device=weight.device)
    out.weight.data = weight.detach()
    if base.bias is not None:
        out.bias.data = base.bias.detach().to(weight.dtype)
    return out.requires_grad_(False)


#: PEFT's name for the same operation
merge_and_unload = unload
