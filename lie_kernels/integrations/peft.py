"""PEFT integration: HiRA on the fused op, and LieRA itself as a PEFT LoRA custom module.

**HiRA.** PEFT's HiRA (``peft.tuners.hira``) computes ``y = base(x) + op(x, W ⊙ (B@A))``
with no scaling, i.e. first-order LieRA with the low-rank parametrization and
scale 1: ``W' = W ⊙ exp_1(B@A)``. Its conv layers hold ``A`` as
``(r, C_in, *kernel)`` and ``B`` as ``(C_out, r, 1, ...)``, which is exactly
``b @ a`` on the ``(C_out, rest)`` unfolding. ``patch_hira`` swaps the
layers' forward for one fused ``lie_weight_lowrank`` call (no ``W ⊙ B@A``
tensor kept for backward, one conv/matmul instead of two).

The fused path needs one active adapter, no active dropout, matching dtypes and
a plain (not ``fan_in_fan_out``) weight; any other case runs PEFT's own forward.

**LieRA.** PEFT (0.21) cannot take a new method type without editing its
``PeftType`` enum, so ``liera_config`` uses the least invasive hook it has:
``LoraConfig._register_custom_module`` (experimental in PEFT), mapping
Linear/Conv1d/2d/3d to ``LieraLayer``. ``get_peft_model``, ``save_pretrained``,
``PeftModel.from_pretrained`` and ``merge_and_unload`` then work as for LoRA.
Limits: the custom-module mapping, ``order`` and ``parametrization`` are not
written to ``adapter_config.json``, so pass the loaded config through
``liera_config`` again before loading; one active adapter at a time; no
``lora_dropout`` (LieRA changes the weight, not the input path).
"""
from __future__ import annotations

import types
from typing import List, Optional

from torch import Tensor, nn
from peft import LoraConfig
from peft.tuners.hira import layer as hira
from peft.tuners.lora import LoraLayer

from ..functional import lie_weight_lowrank
from ..nn.layers import LAYER_TYPES, LieLayer

__all__ = ["patch_hira", "HiraPatch", "liera_config", "LieraLayer"]


def _fusable(layer, args, kwargs) -> bool:
    active = [a for a in layer.active_adapters if a in layer.hira_A]
    if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1:
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    dropout = layer.hira_dropout[active[0]]
    a, w = layer.hira_A[active[0]], layer.get_base_layer().weight
    return (isinstance(dropout, nn.Identity) or not layer.training) and a.dtype == w.dtype


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if not _fusable(self, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.hira_A)
    a, b = self.hira_A[name], self.hira_B[name]
    base = self.get_base_layer()
    w = lie_weight_lowrank(base.weight, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1),
                           order=1, scale=1.0)
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


class HiraPatch:
    """The patched layers; ``remove()`` (or leaving the ``with`` block) restores them."""

    def __init__(self, layers: List[nn.Module]):
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            del layer.forward  # the instance attribute; the class forward shows again

    def __enter__(self) -> "HiraPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch_hira(model: nn.Module) -> HiraPatch:
    """Make every PEFT HiRA Linear/Conv1d/2d/3d layer of ``model`` use the fused op.

    Outputs and gradients equal PEFT's (up to float rounding); merge, unmerge,
    save and load are untouched (they use PEFT's own code). Returns a handle:
    ``patch_hira(model).remove()`` or ``with patch_hira(model): ...``.
    """
    layers = [m for m in model.modules()
              if isinstance(m, (hira.Linear, hira._ConvNd)) and "forward" not in vars(m)]
    if not layers:
        raise ValueError(f"patch_hira: {type(model).__name__} has no unpatched PEFT HiRA "
                         "Linear/Conv layer")
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    return HiraPatch(layers)


class LieraLayer(nn.Module, LoraLayer):
    """A PEFT LoRA-convention layer whose adapters are LieRA (``lk.nn.LieLayer``) factors.

    Each adapter is a ``LieLayer`` stored in ``lora_A[adapter]`` (so PEFT's
    ``lora_`` prefix logic trains, saves and loads it) that reaches the base
    layer without registering it, so the frozen weight is not saved twice.
    Subclasses made by ``liera_config`` fix ``order`` and ``parametrization``.
    """

    order: Optional[int] = 1
    parametrization: Optional[str] = None  # None: LieLayer's default per layer type

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 8, lora_alpha: float = 8, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if config.lora_dropout:
            raise ValueError("LieRA has no input path to drop out: set lora_dropout=0")
        base = self.get_base_layer()
        lie = LAYER_TYPES[type(base)](base, rank=r, alpha=lora_alpha, order=self.order,
                                      parametrization=self.parametrization)
        del lie._modules["base"]  # keep W reachable but out of the adapter's state dict
        object.__setattr__(lie, "base", base)
        # PEFT tracks merging itself (merged_adapters): the flag is not adapter state
        lie.register_buffer("lie_merged", lie.lie_merged, persistent=False)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lie.scale
        self.lora_A[adapter_name] = lie
        self.set_adapter(self.active_adapters)

    def _active_lie(self) -> Optional[LieLayer]:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError(f"LieRA runs one active adapter at a time, got {active}")
        return self.lora_A[active[0]] if active else None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        lie = None if self.disable_adapters or self.merged else self._active_lie()
        if lie is None:
            return self.base_layer(x, *args, **kwargs)
        return lie._apply_weight(x, lie.adapted_weight())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None):
        """``W ← W ⊙ exp_K(sΔ)`` per adapter (exactly invertible by ``unmerge``)."""
        for name in adapter_names or [a for a in self.active_adapters if a in self.lora_A]:
            if name not in self.merged_adapters:
                self.lora_A[name].merge()
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.lora_A[self.merged_adapters.pop()].unmerge()


def liera_config(config: Optional[LoraConfig] = None, *, order: Optional[int] = 1,
                 parametrization: Optional[str] = None, **lora_kwargs) -> LoraConfig:
    """A ``LoraConfig`` whose Linear/Conv1d/2d/3d targets get LieRA adapters.

    ``r`` is the rank (every mode's rank for Tucker), scale is ``lora_alpha / r``;
    ``order`` (None: exact exp) and ``parametrization`` (``"tucker"`` |
    ``"lowrank"``; default: lowrank for Linear, Tucker for convs) choose the
    update. Pass a loaded config (``LoraConfig.from_pretrained``) as ``config``
    to re-register LieRA before ``PeftModel.from_pretrained``.
    """
    if config is None:
        config = LoraConfig(**{"lora_dropout": 0.0, **lora_kwargs})
    elif lora_kwargs:
        raise TypeError("give a config or LoraConfig keyword arguments, not both")
    layer = type("LieraLayer", (LieraLayer,), {"order": order,
                                               "parametrization": parametrization})
    config._register_custom_module({t: layer for t in LAYER_TYPES})
    return config
