"""PEFT integration: HiRA on the fused op, and LieRA itself as a PEFT LoRA custom module.

**HiRA.** PEFT's HiRA (``peft.tuners.hira``) computes ``y = base(x) + op(x, W ⊙ (B@A))``
with no scaling, i.e. first-order LieRA with the low-rank parametrization and
scale 1: ``W' = W ⊙ exp_1(B@A)``. Its conv layers hold ``A`` as
``(r, C_in, *kernel)`` and ``B`` as ``(C_out, r, 1, ...)``, which is exactly
``b @ a`` on the ``(C_out, rest)`` unfolding. ``patch_hira`` swaps the
layers' forward for one ``ops.lie_layer`` node (no ``W ⊙ B@A`` and no W'
kept for backward, one conv/matmul instead of two).

The fused path needs one active adapter, no active dropout, factors in W's dtype
(or fp32 with a fp16/bf16 W: PEFT's default ``autocast_adapter_dtype=True``) and
a plain (not ``fan_in_fan_out``) weight; any other case runs PEFT's own forward.

**LieRA.** PEFT (0.21) cannot take a new method type without editing its
``PeftType`` enum, so ``LieraConfig`` is a ``LoraConfig`` whose custom-module mapping
(``LoraConfig._register_custom_module``, experimental in PEFT) sends Linear/Conv1d/2d/3d
to ``LieraLayer``; PEFT's LoRA code then trains, saves, loads, merges and switches the
adapters. Its ``adapter_config.json`` says ``"peft_type": "LIERA"`` and holds ``order``,
``parametrization``, ``scale`` and ``lie_kernels_version``: importing this module
registers ``LieraConfig`` under that type, so ``PeftModel.from_pretrained(base, path)``
and ``load_adapter`` rebuild LieRA layers with nothing repeated, while plain PEFT refuses
the folder. No ``lora_dropout`` (LieRA changes the weight, not the input path).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from huggingface_hub import ModelCard
from torch import Tensor, nn
from peft import HiraConfig, LoraConfig, PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.hira import layer as hira
from peft.tuners.lora import LoraLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict, load_peft_weights
from safetensors.torch import save_file

from ..quant import layer_weight
from ..validation import check_order, check_scale, factor_dtype_ok
from .. import __version__
from ..nn.layers import LAYER_TYPES, PARAMETRIZATIONS, lie_base_forward, lie_type_for

__all__ = ["patch_hira", "HiraPatch", "LieraConfig", "liera_config", "LieraLayer",
           "save_as_hira", "liera_from_hira"]


def _fusable(layer, args, kwargs) -> bool:
    active = [a for a in layer.active_adapters if a in layer.hira_A]
    if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1:
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    dropout = layer.hira_dropout[active[0]]
    a, b = layer.hira_A[active[0]], layer.hira_B[active[0]]
    dtype = layer_weight(layer.get_base_layer()).dtype  # a quantized W: its compute dtype
    # fp32 factors with a 16-bit W: PEFT's default autocast_adapter_dtype=True
    return ((isinstance(dropout, nn.Identity) or not layer.training)
            and factor_dtype_ok(a.dtype, dtype) and factor_dtype_ok(b.dtype, dtype))


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if not _fusable(self, args, kwargs):
        return self._lk_unpatched.forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.hira_A)
    a, b = self.hira_A[name], self.hira_B[name]
    base = self.get_base_layer()
    # one autograd node per layer (ops.layer): W' = W ⊙ exp_1(B@A) is rebuilt in backward;
    # a bitsandbytes W is read packed, never dequantized whole
    u, p = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
    return lie_base_forward(base, x, layer_weight(base), u, p, 1, 1.0, "auto")


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


def __getattr__(name: str):
    """The fused class of a bitsandbytes HiRA layer, made on first use (unpickling a
    patched model in a fresh process looks it up here): its module imports bitsandbytes,
    which this module does not import unless asked."""
    if name.startswith("_Fused"):
        from peft.tuners.hira import bnb as hira_bnb
        cls = getattr(hira_bnb, name[len("_Fused"):], None)
        if isinstance(cls, type) and issubclass(cls, hira.HiraLayer):
            return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hira_layer(module: nn.Module) -> bool:
    """A PEFT HiRA Linear/Conv layer, or one of its bitsandbytes Linear4bit/Linear8bitLt."""
    return (isinstance(module, (hira.Linear, hira._ConvNd))
            or (isinstance(module, hira.HiraLayer)
                and any(c.__module__.startswith("peft.tuners.hira.bnb")
                        for c in type(module).__mro__)))


def _fallback_reason(layer: nn.Module, padding_semantics: str) -> Optional[str]:
    """Why ``layer`` stays on PEFT's forward, or None when it is fused."""
    base = layer.get_base_layer()
    mode = getattr(base, "padding_mode", "zeros")
    if mode != "zeros" and padding_semantics == "peft":
        return (f"padding_mode={mode!r}: PEFT zero-pads its delta conv, the fused op would "
                f"pad W' with {mode!r} (pass padding_semantics='merged' to fuse it anyway)")
    try:
        layer_weight(base)
    except (TypeError, ValueError) as exc:  # a bitsandbytes weight the op cannot read
        return f"{type(base).__name__}: {exc}"
    return None


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
    hiras = [(n, m) for n, m in model.named_modules() if _hira_layer(m)]
    found = [(n, m) for n, m in hiras if not _patched(m)]
    if not found:
        raise ValueError(f"patch_hira: {type(model).__name__} has no unpatched PEFT HiRA "
                         f"Linear/Conv layer (found {len(hiras)} HiRA layers, "
                         f"{len(hiras) - len(found)} of them patched already)")
    layers, fallbacks = [], {}
    for name, layer in found:
        why = _fallback_reason(layer, padding_semantics)
        if why is not None:
            fallbacks[name] = why
            continue
        layer.__class__ = _fused_class(type(layer))
        layers.append(layer)
    return HiraPatch(layers, fallbacks)


# -- LieRA as a PEFT LoRA custom module ----------------------------------------------------

#: ``peft_type`` in a LieRA ``adapter_config.json``. Plain PEFT has no config class for it,
#: so it refuses the folder (``KeyError: 'LIERA'``) instead of building LoRA layers that
#: ignore the LieRA factors; importing this module registers ``LieraConfig`` under it.
PEFT_TYPE = "LIERA"

#: LoraConfig options LieraLayer does not implement: any value but PEFT's default would
#: be silently ignored, so LieraConfig refuses it (fields this PEFT lacks are skipped)
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora", "use_rslora", "init_lora_weights", "fan_in_fan_out", "lora_bias",
    "use_qalora", "use_bdlora", "target_parameters", "alora_invocation_tokens",
    "megatron_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "arrow_config", "kasa_config")


def _check_liera_options(options: dict, who: str) -> None:
    """Refuse LoRA ``options`` (name -> value) LieRA would ignore; ``who`` heads the error."""
    if options.get("lora_dropout"):
        raise ValueError(f"{who}: lora_dropout must be 0 (LieRA changes the weight, it has no "
                         f"input path to drop out), got {options['lora_dropout']!r}")
    defaults = _fields(LoraConfig())
    for name in UNSUPPORTED_LORA_OPTIONS:
        if name in options and name in defaults and options[name] != defaults[name]:
            raise ValueError(f"{who}: {name}={options[name]!r} is a LoRA option LieRA does "
                             f"not implement (it would be silently ignored); leave it at "
                             f"PEFT's default {defaults[name]!r}")


def _fields(config: LoraConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@dataclass
class LieraConfig(LoraConfig):
    """A ``LoraConfig`` whose Linear/Conv1d/2d/3d targets get LieRA adapters (``LieraLayer``).

    ``r`` is the rank (every mode's rank for Tucker); ``order`` (None: exact exp) and
    ``parametrization`` (``"tucker"`` | ``"lowrank"``; None: lowrank for Linear, Tucker
    for convs) choose the update; its scale is ``scale``, or ``lora_alpha / r`` when None.
    LoRA options LieRA does not implement (``UNSUPPORTED_LORA_OPTIONS``) and a non-zero
    ``lora_dropout`` raise ValueError.

    In memory ``peft_type`` is LORA, so PEFT's LoRA code saves, loads, merges and switches
    the adapters; on disk it is ``"LIERA"`` (``PEFT_TYPE``) with these fields beside
    LoRA's, so ``PeftModel.from_pretrained(base, path)`` rebuilds the adapter wherever this
    module is imported, and plain PEFT refuses the folder.
    """

    order: Optional[int] = field(default=1, metadata={"help": "order K of exp_K; None: exact exp"})
    parametrization: Optional[str] = field(default=None, metadata={
        "help": "'tucker' or 'lowrank'; None: lowrank for Linear, tucker for convs"})
    scale: Optional[float] = field(default=None, metadata={
        "help": "s in W ⊙ exp_K(s·Δ); None: lora_alpha / r per layer"})
    lie_kernels_version: Optional[str] = field(default=None, metadata={
        "help": "lie_kernels version that made the adapter; leave empty to auto-fill"})

    def __post_init__(self):
        super().__post_init__()
        self.order = check_order(self.order)
        if self.parametrization not in (None, *PARAMETRIZATIONS):
            raise ValueError(f"LieraConfig: parametrization must be one of "
                             f"{PARAMETRIZATIONS} or None, got {self.parametrization!r}")
        if self.scale is not None:
            self.scale = check_scale(self.scale)
        if self.lie_kernels_version is None:
            self.lie_kernels_version = __version__
        _check_liera_options(_fields(self), "LieraConfig")
        # PEFT does not save the custom-module mapping: registering it here rebuilds
        # LieRA layers for a config loaded from disk too. Any other targeted module
        # (Embedding, MultiheadAttention, transformers' Conv1D) is refused: PEFT would
        # give it a plain LoRA layer inside a folder that says LIERA
        self._register_custom_module({**{t: LieraLayer for t in LAYER_TYPES},
                                      nn.Module: _refuse_target})

    def to_dict(self) -> dict:
        return {**super().to_dict(), "peft_type": PEFT_TYPE}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        _describe_in_model_card(save_directory, self)


PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LieraConfig

_CARD_HEADING = "## LieRA adapter"
_CARD_INTRO = [
    "A LieRA adapter (`W' = W ⊙ exp_K(s·Δ)`, made with lie_kernels), saved through PEFT.",
    "Its `adapter_config.json` says `\"peft_type\": \"LIERA\"`, which plain PEFT does not",
    "know (it stops with `KeyError: 'LIERA'`). Install lie_kernels, import its PEFT",
    "integration, then load as usual; `order`, `parametrization` and `scale` come from",
    "`adapter_config.json`:",
    "",
    "```python",
    "import lie_kernels.integrations.peft  # registers LieRA with PEFT",
    "from peft import PeftModel",
    "",
    "model = PeftModel.from_pretrained(base_model, \"<this folder or repo id>\")",
    "```",
    "",
    "Adapters saved here:",
]


def _describe_in_model_card(directory: str, config: LieraConfig) -> None:
    """Tag PEFT's model card ``liera`` (not ``lora``) and list the adapter with its settings."""
    # PeftModel.save_pretrained writes the card before the configs: beside the default
    # adapter's config, one folder up from a named adapter's
    folder = os.path.abspath(directory)
    for card_dir, where in ((folder, "this folder"),
                            (os.path.dirname(folder), f"subfolder `{os.path.basename(folder)}`")):
        path = os.path.join(card_dir, "README.md")
        if os.path.isfile(path):
            card = ModelCard.load(path)
            if getattr(card.data, "library_name", None) == "peft":
                break
    else:  # no PEFT card: a config saved on its own
        return
    card.data.tags = sorted(set(card.data.tags or ()) - {"lora"} | {"liera"})
    scale = (f"{config.scale!r}" if config.scale is not None
             else f"lora_alpha / r = {config.lora_alpha} / {config.r}")
    parametrization = config.parametrization or "default (lowrank: Linear, tucker: conv)"
    entry = (f"- {where}: order={'exact' if config.order is None else config.order}, "
             f"parametrization={parametrization}, scale={scale}, r={config.r}; "
             f"lie_kernels {config.lie_kernels_version}")
    lines = card.text.splitlines()
    if _CARD_HEADING not in lines:
        title = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        lines[title:title] = ["", _CARD_HEADING, "", *_CARD_INTRO, ""]
    start = lines.index(_CARD_INTRO[-1], lines.index(_CARD_HEADING)) + 1
    end = start
    while end < len(lines) and lines[end].startswith("- "):
        end += 1
    lines[start:end] = [e for e in lines[start:end] if not e.startswith(f"- {where}:")] + [entry]
    card.text = "\n".join(lines)
    card.save(path)


def _refuse_target(target: nn.Module, adapter_name: str, **kwargs):
    """The custom module PEFT builds for a target LieRA does not adapt: an error."""
    base = target.get_base_layer() if isinstance(target, LoraLayer) else target
    raise TypeError(f"LieraConfig: target {type(base).__name__} cannot get a LieRA adapter "
                    f"(adapter {adapter_name!r}); LieRA adapts nn.Linear, nn.Conv1d/2d/3d and "
                    f"bitsandbytes' Linear4bit/Linear8bitLt: leave it out of target_modules "
                    f"(modules_to_save trains it in full)")


class LieraLayer(nn.Module, LoraLayer):
    """A PEFT LoRA-convention layer whose adapters are LieRA (``lk.nn.LieLayer``) factors.

    Each adapter is a ``LieLayer`` stored in ``lora_A[adapter]`` (so PEFT's ``lora_``
    prefix logic trains, saves, loads, switches and deletes it) that reaches the base
    layer without registering it, so the frozen weight is not saved twice. One active
    adapter runs its own fused op; several run together only with the exact exp, as one
    op on ``W ⊙ exp(s_1 Δ_1 + s_2 Δ_2 + ...)``, which equals applying them in turn.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig,
                 r: int = 8, lora_alpha: float = 8, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if not isinstance(config, LieraConfig):
            raise TypeError(f"LieraLayer: adapter {adapter_name!r} needs a LieraConfig, got a "
                            f"{type(config).__name__}; PEFT would put LoRA and LieRA adapters "
                            f"in one layer, which this layer does not hold")
        base = self.get_base_layer()
        lie_type = lie_type_for(base) or next(t for b, t in LAYER_TYPES.items()
                                              if isinstance(base, b))
        scale = {"alpha": lora_alpha} if config.scale is None else {"scale": config.scale}
        lie = lie_type(base, rank=r, order=config.order,
                       parametrization=config.parametrization, **scale)
        del lie._modules["base"]  # keep W reachable but out of the adapter's state dict
        object.__setattr__(lie, "base", base)
        # PEFT tracks merging itself (merged_adapters): the flag is not adapter state
        lie.register_buffer("lie_merged", lie.lie_merged, persistent=False)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lie.scale
        self.lora_A[adapter_name] = lie
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("LieraLayer: adapter_names (one adapter per batch row) is not "
                             "supported; use set_adapter")
        if self.disable_adapters and self.merged:  # as PEFT's LoRA: disabled means W itself
            self.unmerge()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1:
            return self.lora_A[active[0]].lie_forward(x)
        return self._exact_sum_forward(x, active)

    def _exact_sum_forward(self, x: Tensor, active: List[str]) -> Tensor:
        lies = [self.lora_A[a] for a in active]
        orders = [lie.order for lie in lies]
        if any(o is not None for o in orders):
            raise ValueError(
                f"LieraLayer: active adapters {active} have orders {orders}; several adapters "
                f"run at once only with the exact exp (order=None), where W ⊙ exp(s1·Δ1) ⊙ "
                f"exp(s2·Δ2) = W ⊙ exp(s1·Δ1 + s2·Δ2); activate one adapter (set_adapter)")
        # Δ_(1) = u @ p per adapter: s1·Δ1 + s2·Δ2 = [s1·u1, s2·u2] @ [p1; p2], one small-K GEMM
        gemms = [lie.gemm_args() for lie in lies]
        u = torch.cat([lie.scale * g[1] for lie, g in zip(lies, gemms)], dim=1)
        p = torch.cat([g[2] for g in gemms], dim=0)
        base = self.get_base_layer()
        return lie_base_forward(base, x, gemms[0][0], u, p, None, 1.0, lies[0].backend)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None):
        """``W ← W ⊙ exp_K(sΔ)`` (exactly invertible by ``unmerge``); a merge that
        ``unmerge`` could not undo is always refused, so ``safe_merge`` adds nothing."""
        names = [a for a in (adapter_names or self.active_adapters)
                 if a in self.lora_A and a not in self.merged_adapters]
        if len(self.merged_adapters) + len(names) > 1:
            raise ValueError(
                f"LieraLayer: one LieRA adapter per layer can be merged into W, got "
                f"{names} to merge with {self.merged_adapters} merged already; set_adapter "
                f"to one adapter (unmerge first) before merging")
        for name in names:
            self.lora_A[name].merge()
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.lora_A[self.merged_adapters.pop()].unmerge()


def liera_config(config: Optional[LoraConfig] = None, **kwargs) -> LieraConfig:
    """``LieraConfig(**kwargs)``; or, given a ``LoraConfig`` (one loaded from a folder saved
    before LieRA wrote ``"peft_type": "LIERA"``), the ``LieraConfig`` with its fields and
    ``kwargs`` (``order``, ``parametrization``, ``scale``) on top."""
    if config is None:
        _check_liera_options(kwargs, "liera_config")
        return LieraConfig(**kwargs)
    extra = set(kwargs) - {"order", "parametrization", "scale"}
    if extra:
        raise TypeError(f"liera_config: with a config, only order, parametrization and "
                        f"scale may be given, got {sorted(extra)}")
    _check_liera_options(_fields(config), "liera_config")
    return LieraConfig(**{**_fields(config), **kwargs})


# -- HiRA interop: order-1 low-rank LieRA with scale s is HiRA with B scaled by s ----------

def save_as_hira(model: PeftModel, save_directory: str, adapter_name: str = "default") -> None:
    """Write LieRA adapter ``adapter_name`` of ``model`` as a PEFT HiRA adapter folder.

    Order-1 low-rank LieRA, ``W ⊙ (1 + s·B@A)``, is HiRA's ``W + W ⊙ (B'@A)`` with
    ``B' = s·B``: the folder (``HiraConfig``, ``hira_A``/``hira_B``) loads in plain PEFT
    and gives the same outputs up to float rounding. Refused (ValueError naming the
    layer) for another order or parametrization, a grouped conv (HiRA has none) or a
    merged adapter.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_as_hira: model must be a peft.PeftModel, got "
                        f"{type(model).__name__}")
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, LieraConfig):
        raise ValueError(f"save_as_hira: adapter_name must name a LieRA adapter of the model "
                         f"(LieraConfig), got {adapter_name!r} with "
                         f"{type(config).__name__ if config else 'no adapter of that name'}")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    layers = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LieraLayer) or adapter_name not in layer.lora_A:
            continue
        lie, base = layer.lora_A[adapter_name], layer.get_base_layer()
        groups = getattr(base, "groups", 1)
        why = (f"order={lie.order}, HiRA is order 1" if lie.order != 1 else
               f"parametrization={lie.parametrization!r}, HiRA is 'lowrank'"
               if lie.parametrization != "lowrank" else
               f"groups={groups}, HiRA has no grouped convs" if groups != 1 else
               "merged into W, unmerge it first" if lie.merged else None)
        if why:
            raise ValueError(f"save_as_hira: layer {name} of adapter {adapter_name!r}: {why}")
        layers[name] = lie
    # PEFT 0.21's HiRA builds every layer with rank r (it ignores rank_pattern): zero rows
    # of A and columns of B bring each layer to the largest rank without changing B@A
    r = max(lie.ranks for lie in layers.values())
    for name, lie in layers.items():
        for key in [k for k in state if k.startswith(f"{name}.lora_A.")]:
            del state[key]
        w, pad = lie.base.weight, r - lie.ranks
        a = nn.functional.pad(lie.lie_a.detach(), (0, 0, 0, pad))
        b = nn.functional.pad(lie.scale * lie.lie_b.detach(), (0, pad))
        state[f"{name}.hira_A"] = a.reshape(r, *w.shape[1:])
        state[f"{name}.hira_B"] = b.reshape(w.shape[0], r, *[1] * (w.dim() - 2))
    # the exact layer names, so no pattern of the LieRA config needs translating
    hira_config = HiraConfig(r=r, target_modules=[n[len("base_model.model."):] for n in layers],
                             modules_to_save=config.modules_to_save,
                             task_type=config.task_type,
                             base_model_name_or_path=config.base_model_name_or_path,
                             revision=config.revision, inference_mode=True)
    _write_adapter(save_directory, hira_config, state)


def liera_from_hira(hira_directory: str, save_directory: str) -> LieraConfig:
    """Convert a PEFT HiRA adapter folder into a LieRA one (order 1, low-rank, scale 1),
    which ``PeftModel.from_pretrained`` loads with the same outputs as the HiRA adapter up
    to float rounding. Returns the written config."""
    hira_config = PeftConfig.from_pretrained(hira_directory)
    if not isinstance(hira_config, HiraConfig):
        raise ValueError(f"liera_from_hira: hira_directory must hold a HiRA adapter, got a "
                         f"{type(hira_config).__name__} in {hira_directory}")
    if hira_config.fan_in_fan_out:
        raise ValueError("liera_from_hira: fan_in_fan_out=True (a transposed weight) is not "
                         "supported, got it in the HiRA config")
    state, ranks = {}, {}
    for key, t in load_peft_weights(hira_directory, device="cpu").items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("hira_A", "hira_B"):  # (r, *W.shape[1:]) and (C_out, r, 1, ...)
            state[f"{module}.lora_A.{'lie_a' if leaf == 'hira_A' else 'lie_b'}"] = \
                t.reshape(t.shape[0], -1).contiguous()
            if leaf == "hira_A":
                ranks[re.escape(module[len("base_model.model."):])] = t.shape[0]
        elif "hira_" in key:
            raise ValueError(f"liera_from_hira: {key} is not a HiRA Linear/Conv factor "
                             f"(hira_A, hira_B); LieRA has no embedding layers")
        else:  # modules_to_save and the like: format-independent
            state[key] = t
    h = hira_config
    # ranks from the factors themselves: PEFT 0.21's HiRA ignores its rank_pattern
    config = LieraConfig(r=h.r, lora_alpha=h.r, order=1, parametrization="lowrank", scale=1.0,
                         target_modules=h.target_modules, exclude_modules=h.exclude_modules,
                         layers_to_transform=h.layers_to_transform,
                         layers_pattern=h.layers_pattern,
                         rank_pattern={k: r for k, r in ranks.items() if r != h.r},
                         modules_to_save=h.modules_to_save, task_type=h.task_type,
                         base_model_name_or_path=h.base_model_name_or_path,
                         revision=h.revision, inference_mode=True)
    _write_adapter(save_directory, config, state)
    return config


def _write_adapter(directory: str, config: PeftConfig, state: Dict[str, Tensor]) -> None:
    """An adapter folder as PEFT writes one: its config and safetensors weights."""
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(state, os.path.join(directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
