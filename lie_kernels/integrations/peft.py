"""PEFT integration: HiRA on the fused op, and LieRA itself as a PEFT LoRA custom module.

**HiRA.** PEFT's HiRA (``peft.tuners.hira``) computes ``y = base(x) + op(x, W ⊙ (B@A))``
with no scaling, i.e. first-order LieRA with the low-rank parametrization and
scale 1: ``W' = W ⊙ exp_1(B@A)``. Its conv layers hold ``A`` as
``(r, C_in, *kernel)`` and ``B`` as ``(C_out, r, 1, ...)``, which is exactly
``b @ a`` on the ``(C_out, rest)`` unfolding. ``patch_hira`` swaps the
layers' forward for one ``layer_ops.lie_layer`` node (no ``W ⊙ B@A`` and no W'
kept for backward, one conv/matmul instead of two).

The fused path needs one active adapter, no active dropout, factors in W's dtype
(or fp32 with a fp16/bf16 W: PEFT's default ``autocast_adapter_dtype=True``) and
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

from typing import Dict, List, Optional

from torch import Tensor, nn
from peft import LoraConfig
from peft.tuners.hira import layer as hira
from peft.tuners.lora import LoraLayer

from ..layer_ops import conv_geometry, lie_layer
from .._validate import factor_dtype_ok
from ..nn.layers import LAYER_TYPES, LieLayer

__all__ = ["patch_hira", "HiraPatch", "liera_config", "LieraLayer"]


def _fusable(layer, args, kwargs) -> bool:
    active = [a for a in layer.active_adapters if a in layer.hira_A]
    if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1:
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    dropout = layer.hira_dropout[active[0]]
    a, b = layer.hira_A[active[0]], layer.hira_B[active[0]]
    w = layer.get_base_layer().weight
    # fp32 factors with a 16-bit W: PEFT's default autocast_adapter_dtype=True
    return ((isinstance(dropout, nn.Identity) or not layer.training)
            and factor_dtype_ok(a.dtype, w.dtype) and factor_dtype_ok(b.dtype, w.dtype))


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if not _fusable(self, args, kwargs):
        return self._lk_unpatched.forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.hira_A)
    a, b = self.hira_A[name], self.hira_B[name]
    base = self.get_base_layer()
    # one autograd node per layer (layer_ops): W' = W ⊙ exp_1(B@A) is rebuilt in backward
    u, p = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
    if isinstance(base, nn.Linear):
        return lie_layer(x, base.weight, base.bias, u, p, 1, 1.0, "auto")
    xp, geometry, unbatched = conv_geometry(base, x)
    y = lie_layer(xp, base.weight, base.bias, u, p, 1, 1.0, "auto", geometry)
    return y.squeeze(0) if unbatched else y


# Patching swaps a layer's class for a subclass whose forward is ``_fused_forward``: an
# instance attribute (a bound method) would not survive torch.save/torch.load. The
# subclasses live in this module under fixed names, so pickle finds them after import.
_FUSED: Dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED:
        name = f"_Fused{cls.__name__}"
        if name in globals():  # another HiRA class of that name (a user subclass)
            name = f"{name}_{len(_FUSED)}"
        _FUSED[cls] = type(name, (cls,), {"forward": _fused_forward, "_lk_unpatched": cls,
                                         "__module__": __name__, "__qualname__": name})
        globals()[name] = _FUSED[cls]
    return _FUSED[cls]


for _cls in (hira.Linear, hira.Conv1d, hira.Conv2d, hira.Conv3d):
    _fused_class(_cls)


def _patched(layer: nn.Module) -> bool:
    return type(layer) in _FUSED.values()


class HiraPatch:
    """The patched layers; ``remove()`` (or leaving the ``with`` block) restores them.

    ``fallbacks`` maps each HiRA layer left on PEFT's own forward to the reason
    (``len(handle.fallbacks)`` counts them).
    """

    def __init__(self, layers: List[nn.Module], fallbacks: Optional[Dict[str, str]] = None):
        self.layers = layers
        self.fallbacks: Dict[str, str] = dict(fallbacks or {})

    def remove(self) -> None:
        """Restore PEFT's forward; a second call does nothing."""
        for layer in self.layers:
            if _patched(layer):
                layer.__class__ = layer._lk_unpatched

    def __enter__(self) -> "HiraPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


PADDING_SEMANTICS = ("peft", "merged")


def patch_hira(model: nn.Module, *, padding_semantics: str = "peft") -> HiraPatch:
    """Make every PEFT HiRA Linear/Conv1d/2d/3d layer of ``model`` use the fused op.

    Outputs and gradients equal PEFT's (up to float rounding); merge, unmerge,
    save and load are untouched (they use PEFT's own code). Returns a handle:
    ``patch_hira(model).remove()`` or ``with patch_hira(model): ...``.

    Convs with a ``padding_mode`` other than ``"zeros"``: PEFT pads ``base(x)``
    with that mode but its delta conv with zeros, so its unmerged forward differs
    from its own merged model, which the fused op (W' through the layer itself)
    computes. ``padding_semantics="peft"`` (default) leaves those layers on
    PEFT's forward, listed in ``handle.fallbacks``; ``"merged"`` fuses them too,
    computing what PEFT's merged model computes (different numbers from PEFT's
    unmerged forward).
    """
    if padding_semantics not in PADDING_SEMANTICS:
        raise ValueError(f"patch_hira: padding_semantics must be one of {PADDING_SEMANTICS}, "
                         f"got {padding_semantics!r}")
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (hira.Linear, hira._ConvNd)) and not _patched(m)]
    if not found:
        raise ValueError(f"patch_hira: {type(model).__name__} has no unpatched PEFT HiRA "
                         "Linear/Conv layer")
    layers, fallbacks = [], {}
    for name, layer in found:
        mode = getattr(layer.get_base_layer(), "padding_mode", "zeros")
        if mode != "zeros" and padding_semantics == "peft":
            fallbacks[name] = (f"padding_mode={mode!r}: PEFT zero-pads its delta conv, the "
                               f"fused op would pad W' with {mode!r} (pass "
                               f"padding_semantics='merged' to fuse it anyway)")
            continue
        layer.__class__ = _fused_class(type(layer))
        layers.append(layer)
    return HiraPatch(layers, fallbacks)


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
        return lie.lie_forward(x)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None):
        """``W ← W ⊙ exp_K(sΔ)`` per adapter (exactly invertible by ``unmerge``)."""
        for name in adapter_names or [a for a in self.active_adapters if a in self.lora_A]:
            if name not in self.merged_adapters:
                self.lora_A[name].merge()
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.lora_A[self.merged_adapters.pop()].unmerge()


#: LoraConfig options LieraLayer does not implement: any value but PEFT's default would
#: be silently ignored, so liera_config refuses it (fields this PEFT lacks are skipped)
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora", "use_rslora", "init_lora_weights", "fan_in_fan_out", "lora_bias",
    "use_qalora", "use_bdlora", "target_parameters", "alora_invocation_tokens",
    "megatron_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "arrow_config", "kasa_config")


def _check_liera_options(config: LoraConfig) -> None:
    if config.lora_dropout:
        raise ValueError(f"liera_config: lora_dropout must be 0 (LieRA changes the weight, "
                         f"it has no input path to drop out), got {config.lora_dropout!r}")
    defaults = LoraConfig()
    for name in UNSUPPORTED_LORA_OPTIONS:
        if hasattr(defaults, name) and getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"liera_config: {name}={getattr(config, name)!r} is a LoRA "
                             f"option LieRA does not implement (it would be silently "
                             f"ignored); leave it at PEFT's default "
                             f"{getattr(defaults, name)!r}")


def liera_config(config: Optional[LoraConfig] = None, *, order: Optional[int] = 1,
                 parametrization: Optional[str] = None, **lora_kwargs) -> LoraConfig:
    """A ``LoraConfig`` whose Linear/Conv1d/2d/3d targets get LieRA adapters.

    ``r`` is the rank (every mode's rank for Tucker), scale is ``lora_alpha / r``;
    ``order`` (None: exact exp) and ``parametrization`` (``"tucker"`` |
    ``"lowrank"``; default: lowrank for Linear, Tucker for convs) choose the
    update. Pass a loaded config (``LoraConfig.from_pretrained``) as ``config``
    to re-register LieRA before ``PeftModel.from_pretrained``. LoRA options LieRA
    does not implement (``use_dora``, ``use_rslora``, ``init_lora_weights``, ...:
    ``UNSUPPORTED_LORA_OPTIONS``) and a non-zero ``lora_dropout`` raise ValueError.
    """
    if config is None:
        config = LoraConfig(**{"lora_dropout": 0.0, **lora_kwargs})
    elif lora_kwargs:
        raise TypeError("give a config or LoraConfig keyword arguments, not both")
    _check_liera_options(config)
    layer = type("LieraLayer", (LieraLayer,), {"order": order,
                                               "parametrization": parametrization})
    config._register_custom_module({t: layer for t in LAYER_TYPES})
    return config
