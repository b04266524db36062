"""LieRA layers: wrap an existing Linear/Conv layer, freeze its weight, train factors.

The layer computes ``y = layer(x; W')`` with ``W' = W ⊙ exp_K(scale · Δ)``.
Δ is built from a Tucker core and per-mode factors (``parametrization="tucker"``,
default for convs; it keeps the kernel's spatial structure) or from ``b @ a``
on the ``(C_out, rest)`` unfolding (``"lowrank"``, default for Linear).
Grouped and depthwise convs need nothing special: the factors follow the
weight's own shape ``(C_out, C_in/groups, *kernel)``.

Initialisation makes ``W' == W`` bitwise: the core (or ``b``) starts at zero.
"""
from __future__ import annotations

import math
import numbers
import struct
import threading
import weakref
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..backends import check_backend
from ..validation import check_order, check_scale, check_weight
from ..functional import lie_weight, lie_weight_lowrank
from ..ops import conv_geometry, lie_layer
from ..order import decode_order, encode_order
from ..quant import QuantizedWeight, bnb_linear, layer_weight
from ..series import compute_dtype, divide_out, exp_series, multiply_in
from ..reference import tucker_einsum
from ..tucker import tucker_to_gemm

PARAMETRIZATIONS = ("tucker", "lowrank")
#: id(weight) -> the Lie layer that merged into it (weakly held; a layer checks that
#: its entry's weight *is* its own, so a reused id never matches). Kept off the
#: Parameter itself, which must stay picklable.
_MERGED_INTO: "weakref.WeakValueDictionary[int, LieLayer]" = weakref.WeakValueDictionary()
#: per thread: Lie layer -> [exposure depth, W' once read] (see ``LieLayer.expose``). Per
#: thread, so that one thread's forward can neither see nor end another thread's exposure.
_EXPOSED = threading.local()


def _exposed() -> dict:
    try:
        return _EXPOSED.layers
    except AttributeError:
        _EXPOSED.layers = {}
        return _EXPOSED.layers


def _ranks(rank, shape: Sequence[int], parametrization: str):
    given = rank  # errors quote what the caller gave, not the per-mode expansion
    if parametrization == "lowrank":
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"rank must be an int >= 1 for parametrization='lowrank', "
                             f"got {rank!r}")
        return int(rank)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        rank = [rank] * len(shape)
    if (not isinstance(rank, (list, tuple)) or len(rank) != len(shape)
            or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1
                   for r in rank)):
        raise ValueError(f"rank must be an int >= 1 or one int >= 1 per weight dim "
                         f"({len(shape)} for weight shape {tuple(shape)}), got {given!r}")
    return tuple(min(int(r), d) for r, d in zip(rank, shape))


def _orthonormal(rows: int, cols: int, dtype, device) -> Tensor:
    # QR has no fp16/bf16 kernels on CPU: draw in fp32, then cast.
    q = nn.init.orthogonal_(torch.empty(rows, cols, device=device))
    return q.to(dtype)


class LieLayer(nn.Module):
    """Shared machinery of the Lie layers; subclasses say which base type they wrap."""

    base_type: type = nn.Module
    default_parametrization = "tucker"

    def __init__(self, base: nn.Module, *, rank: Union[int, Sequence[int], None] = None,
                 parametrization: Optional[str] = None, order: Optional[int] = 1,
                 alpha: Optional[float] = None, scale: Optional[float] = None,
                 backend: str = "auto", r: Union[int, Sequence[int], None] = None):
        super().__init__()
        if not isinstance(base, self.base_type):
            raise TypeError(f"{type(self).__name__} wraps an nn.{self.base_type.__name__}, "
                            f"got {type(base).__name__}")
        if type(base).forward is not self.base_type.forward and not bnb_linear(base):
            raise TypeError(f"{type(self).__name__} wraps an nn.{self.base_type.__name__}, "
                            f"got {type(base).__name__}, a subclass with its own forward "
                            f"that the Lie layer would bypass")
        if rank is not None and r is not None:
            raise TypeError(f"give rank or its alias r, not both (got rank={rank!r}, r={r!r})")
        rank = rank if rank is not None else (r if r is not None else 8)
        check_backend(backend)
        if parametrization is None:
            parametrization = self.default_parametrization
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, "
                             f"got {parametrization!r}")
        w = check_weight(layer_weight(base), "base.weight")
        self.order = check_order(order)
        self.ranks = _ranks(rank, w.shape, parametrization)
        r = self.ranks if isinstance(self.ranks, int) else self.ranks[0]
        if scale is not None and alpha is not None:
            raise ValueError("give alpha (scale = alpha / rank) or scale, not both")
        if alpha is not None:
            alpha = check_scale(alpha, "alpha")
            try:
                self.scale = check_scale(alpha / r, dtype=w.dtype)
            except ValueError as exc:
                raise ValueError(f"alpha={alpha!r} gives scale = alpha / rank = {alpha / r!r}; "
                                 f"{exc}") from None
        else:
            self.scale = check_scale(1.0 if scale is None else scale, dtype=w.dtype)
        # every check passed: only now touch the wrapped layer
        self.base = base
        self.parametrization = parametrization
        self.backend = backend
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        kw = dict(dtype=w.dtype, device=w.device)
        if parametrization == "lowrank":
            self.lie_a = nn.Parameter(torch.empty(self.ranks, math.prod(w.shape[1:]), **kw))
            nn.init.kaiming_uniform_(self.lie_a, a=5 ** 0.5)
            self.lie_b = nn.Parameter(torch.zeros(w.shape[0], self.ranks, **kw))
        else:
            self.lie_core = nn.Parameter(torch.zeros(self.ranks, **kw))
            for n, (d, rn) in enumerate(zip(w.shape, self.ranks)):
                # A full-rank factor adds nothing the core cannot hold: use the identity.
                f = None if rn == d else nn.Parameter(_orthonormal(d, rn, **kw))
                self.register_parameter(f"lie_u{n}", f)
        self.register_buffer("lie_merged", torch.zeros((), dtype=torch.bool))
        # the update's definition, saved with the factors (int64: dtype casts leave it alone)
        self.register_buffer("lie_config", self._config_code().to(w.device))
        #: (order, scale) the weight was merged with: unmerge must divide by that factor
        self._merged_config: Optional[tuple] = None
        # mirrors lie_merged (saved in the state_dict): reading a tensor in forward
        # would break torch.compile graphs
        self._merged = False
        #: W' built ahead of forward by ``batch_builds`` (one call for many layers)
        self.prebuilt: Optional[Tensor] = None

    # -- the update ---------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged

    # Read-only views of the wrapped layer, for code that reads ``layer.weight``: not
    # registered, so the state_dict holds W once, under ``base.weight``.
    @property
    def weight(self) -> Tensor:
        """The wrapped layer's W (frozen; ``W'`` once merged). While this thread runs a
        parent that reads ``.weight`` instead of calling this layer (``nn.MultiheadAttention``
        and its ``out_proj``, hooked by ``inject``; see ``expose``), this is ``W'``."""
        slot = None if self._merged else _exposed().get(self)
        if slot is None:
            return self.base.weight
        if slot[1] is None:  # built on first read: a path that only calls the layer pays nothing
            slot[1] = self.prebuilt if self.prebuilt is not None else self.adapted_weight()
        return slot[1]

    def expose(self) -> None:
        """Make ``.weight`` read ``W'`` (differentiable) in this thread until the matching
        ``conceal``; calls nest. For a parent module whose forward reads the weight."""
        _exposed().setdefault(self, [0, None])[0] += 1

    def conceal(self) -> None:
        """Undo one ``expose`` of this thread."""
        exposed = _exposed()
        slot = exposed.get(self)
        if slot is not None:
            slot[0] -= 1
            if slot[0] <= 0:
                del exposed[self]

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias

    def __setattr__(self, name: str, value) -> None:
        # nn.Module would register a Parameter named weight/bias beside the properties
        if name in ("weight", "bias"):
            raise AttributeError(f"{type(self).__name__}.{name} is read-only (the wrapped "
                                 f"layer's); assign {type(self).__name__}.base.{name}")
        super().__setattr__(name, value)

    def __setstate__(self, state):  # unpickled (torch.load, deepcopy): re-register a merge
        super().__setstate__(state)
        if self._merged:
            _MERGED_INTO[id(self.base.weight)] = self

    def _config_code(self) -> Tensor:
        """``[[order (-1: exact), bits of the fp64 scale, parametrization index]]``; one
        2-D row so PEFT's save check (1-D ``lora_*`` tensors = ungathered shards) is quiet."""
        return torch.tensor([[encode_order(self.order),
                              struct.unpack("<q", struct.pack("<d", self.scale))[0],
                              PARAMETRIZATIONS.index(self.parametrization)]], dtype=torch.int64)

    @staticmethod
    def _describe(code) -> str:
        order, bits, par = (int(c) for c in code.flatten())
        scale = struct.unpack("<d", struct.pack("<q", bits))[0]
        return (f"order={decode_order(order)}, scale={scale!r}, "
                f"parametrization={PARAMETRIZATIONS[par]!r}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.lie_config.device.type != "meta":
            self.lie_config.copy_(self._config_code())  # order/scale may have been reassigned
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The config is checked, never loaded: it must describe this layer. Checkpoints
        # from before it existed load as before (the key is simply absent).
        saved = state_dict.pop(prefix + "lie_config", None)
        mine = self._config_code()
        if saved is not None and not torch.equal(saved.cpu(), mine):
            error_msgs.append(
                f"{prefix}lie_config: the checkpoint's update is {self._describe(saved)}, this "
                f"{type(self).__name__} has {self._describe(mine)}; build the layer with the "
                f"checkpoint's settings")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "lie_config" in missing_keys:
            missing_keys.remove(prefix + "lie_config")
        self._merged = bool(self.lie_merged)
        self._merged_config = (self.order, self.scale) if self._merged else None
        if self._merged:
            _MERGED_INTO[id(self.base.weight)] = self

    @property
    def quantized(self) -> bool:
        """Whether the wrapped layer keeps W in 4 or 8 bits (a bitsandbytes Linear): the
        Lie layer then reads ``deq(W)`` from the packed weight (``lie_kernels.quant``)."""
        return bnb_linear(self.base)

    @property
    def weight_shape(self) -> torch.Size:
        """W's logical shape (a packed 4-bit weight's tensor has another)."""
        return layer_weight(self.base).shape if self.quantized else self.base.weight.shape

    def factors(self):
        return [getattr(self, f"lie_u{n}") for n in range(len(self.weight_shape))]

    def adapted_weight(self) -> Tensor:
        """``W ⊙ exp_K(scale · Δ)`` (differentiable in the factors; ``deq(W)`` for a
        quantized base, in its compute dtype)."""
        w = layer_weight(self.base)
        kw = dict(order=self.order, scale=self.scale, backend=self.backend)
        if self.parametrization == "lowrank":
            return lie_weight_lowrank(w, self.lie_a, self.lie_b, **kw)
        return lie_weight(w, self.lie_core, self.factors(), **kw)

    def gemm_args(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(W, u, p)`` with ``Δ_(1) = u @ p``: what the fused op consumes (W a
        ``QuantizedWeight`` for a quantized base)."""
        w = layer_weight(self.base)
        if self.parametrization == "lowrank":
            return w, self.lie_b, self.lie_a
        return (w, *tucker_to_gemm(w, self.lie_core, self.factors()))

    def delta(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Δ itself, materialised (for merge/unmerge and inspection only), computed in
        ``dtype`` (default: the factors' own; merge uses fp32, where 16-bit factors'
        intermediate products cannot overflow)."""
        def cast(t):
            return t if t is None or dtype is None else t.to(dtype)
        if self.parametrization == "lowrank":
            return (cast(self.lie_b) @ cast(self.lie_a)).view(self.weight_shape)
        return tucker_einsum(cast(self.lie_core), [cast(f) for f in self.factors()])

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self.prebuilt is not None:
            return self._apply_weight(x, self.prebuilt)
        return self.lie_forward(x)

    def lie_forward(self, x: Tensor) -> Tensor:
        """``y = layer(x; W')`` as one autograd node (``ops.layer``): W' is rebuilt in
        backward instead of being kept alive from forward to backward."""
        w, u, p = self.gemm_args()
        return lie_base_forward(self.base, x, w, u, p, self.order, self.scale, self.backend)

    def _apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    # -- merge / unmerge (the group action and its inverse) -----------------------
    def _group_element(self) -> Tensor:
        """``exp_K(scale · Δ)`` in fp32 (fp64 for fp64 weights)."""
        cd = compute_dtype(self.base.weight.dtype)
        return exp_series(self.scale * self.delta(cd), self.order)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """What ``merge`` would write, after every check ``merge`` makes; W is untouched.

        Refused (ValueError) unless ``unmerge`` restores every entry within 1 ulp of
        W's dtype (see ``series.multiply_in``); refused (RuntimeError) when the layer
        is merged already or its weight is tied to a Lie layer that merged into it.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        if self.quantized:
            raise RuntimeError(
                f"cannot merge {type(self).__name__}: its base keeps W in "
                f"{layer_weight(self.base).kind}, and W ⊙ exp_K(scale·Δ) requantised is no "
                f"longer exactly invertible; lk.unload(model, quantized='dequantize') gives a "
                f"dense layer holding W' exactly, quantized='requantize' a "
                f"{type(self.base).__name__} holding it requantised (lossy)")
        w = self.base.weight
        owner = _MERGED_INTO.get(id(w))
        if owner is not None and owner is not self and owner.merged and owner.base.weight is w:
            raise RuntimeError(
                f"cannot merge {type(self).__name__}: its weight is tied (one Parameter) to "
                f"another {type(owner).__name__} that has already merged its update into it; "
                f"one weight can hold one update, so keep tied layers unmerged")
        odd = self.order is not None and self.order % 2 == 1
        what = "exp(scale·Δ)" if self.order is None else f"exp_{self.order}(scale·Δ)"
        return multiply_in(w, self._group_element(), what,
                           "; an even order keeps exp_K strictly positive" if odd else "")

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W ⊙ exp_K(scale·Δ)`` in fp32, cast back; forward then uses the base layer.

        ``unmerge`` divides by the very same fp32 ``exp_K(scale·Δ)`` (exact exp
        included), so the round trip costs two roundings of W, whatever the order.
        A merge that unmerge could not undo within 1 ulp (a 16-bit product that
        overflows or underflows, ``exp_K = 0``) is refused, W left unchanged.
        """
        w = self.base.weight
        w.copy_(self.merged_weight())
        _MERGED_INTO[id(w)] = self  # lets a layer tied to this weight see the merge
        self._merged_config = (self.order, self.scale)
        self.lie_merged.fill_(True)
        self._merged = True

    def check_unmerge(self) -> None:
        """Raise unless ``unmerge`` can run: merged, with the order and scale of the merge."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        merged_with = self._merged_config
        if merged_with is not None and merged_with != (self.order, self.scale):
            raise ValueError(
                f"cannot unmerge: the weight was merged with order={merged_with[0]}, "
                f"scale={merged_with[1]!r} but the layer now has order={self.order}, "
                f"scale={self.scale!r}; dividing by a different exp_K(scale·Δ) would not "
                f"restore W. Set order and scale back before unmerging")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with the group inverse: divide by the same fp32 ``exp_K(scale·Δ)``."""
        self.check_unmerge()
        w = self.base.weight
        w.copy_(divide_out(w, self._group_element()))  # zeros never move
        if _MERGED_INTO.get(id(w)) is self:
            del _MERGED_INTO[id(w)]
        self._merged_config = None
        self.lie_merged.fill_(False)
        self._merged = False

    def extra_repr(self) -> str:
        return (f"parametrization={self.parametrization!r}, rank={self.ranks}, "
                f"order={self.order}, scale={self.scale:g}, merged={self.merged}")


def lie_base_forward(base: nn.Module, x: Tensor, weight, u: Tensor, p: Tensor,
                     order: Optional[int], scale: float, backend: str) -> Tensor:
    """``base(x)`` with ``W' = weight ⊙ exp_K(scale · (u @ p).view(W.shape))`` in place of
    its W (``weight``: ``quant.layer_weight(base)``), as one autograd node: a Linear, a
    Conv1d/2d/3d (its padding mode and unbatched inputs as its own forward does), or a
    bitsandbytes Linear (x and bias in its compute dtype, y back in x's, as its own
    forward does). What the Lie layers and the PEFT integration run."""
    if isinstance(weight, QuantizedWeight):
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return lie_layer(x.to(weight.dtype), weight, bias, u, p, order, scale,
                         backend).to(x.dtype)
    if isinstance(base, nn.Linear):
        return lie_layer(x, weight, base.bias, u, p, order, scale, backend)
    xp, geometry, unbatched = conv_geometry(base, x)
    y = lie_layer(xp, weight, base.bias, u, p, order, scale, backend, geometry)
    return y.squeeze(0) if unbatched else y


class LieLinear(LieLayer):
    base_type = nn.Linear
    default_parametrization = "lowrank"

    def _apply_weight(self, x, weight):
        bias = self.base.bias
        if self.quantized:
            return nn.functional.linear(x.to(weight.dtype), weight,
                                        None if bias is None else bias.to(weight.dtype)
                                        ).to(x.dtype)
        return nn.functional.linear(x, weight, bias)


class _LieConv(LieLayer):
    def _apply_weight(self, x, weight):
        return self.base._conv_forward(x, weight, self.base.bias)


class LieConv1d(_LieConv):
    base_type = nn.Conv1d


class LieConv2d(_LieConv):
    base_type = nn.Conv2d


class LieConv3d(_LieConv):
    base_type = nn.Conv3d


#: base layer type -> Lie layer type, as ``inject`` uses it
LAYER_TYPES = {nn.Linear: LieLinear, nn.Conv1d: LieConv1d, nn.Conv2d: LieConv2d,
               nn.Conv3d: LieConv3d}


def lie_type_for(module: nn.Module) -> Optional[type]:
    """The Lie layer type that can wrap ``module``, or None.

    Subclasses of Linear/Conv1d/2d/3d qualify when they keep the base forward
    (``nn.MultiheadAttention``'s ``NonDynamicallyQuantizableLinear``): a Lie layer
    calls the base computation with ``W'``, so a subclass with its own forward (timm's
    ``Conv2dSame``, ``StdConv2d``) would be silently bypassed and does not qualify.
    ConvTranspose layers are not Conv subclasses and do not qualify either.
    bitsandbytes' ``Linear4bit``/``Linear8bitLt`` qualify: the Lie layer reads their
    packed weight and computes as their forward does (``lie_kernels.quant``).
    """
    if bnb_linear(module):
        return LieLinear
    for base_type, lie_type in LAYER_TYPES.items():
        if isinstance(module, base_type) and type(module).forward is base_type.forward:
            return lie_type
    return None
