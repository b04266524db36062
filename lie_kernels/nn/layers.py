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

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._validate import check_order, check_scale
from ..functional import lie_weight, lie_weight_lowrank
from ..series import compute_dtype, exp_series
from ..reference import tucker_einsum
from ..tucker import tucker_to_gemm

PARAMETRIZATIONS = ("tucker", "lowrank")


def _ranks(rank, shape: Sequence[int], parametrization: str):
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
                         f"({len(shape)} for weight shape {tuple(shape)}), got {rank!r}")
    return tuple(min(int(r), d) for r, d in zip(rank, shape))


def _orthonormal(rows: int, cols: int, dtype, device) -> Tensor:
    # QR has no fp16/bf16 kernels on CPU: draw in fp32, then cast.
    q = nn.init.orthogonal_(torch.empty(rows, cols, device=device))
    return q.to(dtype)


class LieLayer(nn.Module):
    """Shared machinery of the Lie layers; subclasses say which base type they wrap."""

    base_type: type = nn.Module
    default_parametrization = "tucker"

    def __init__(self, base: nn.Module, *, rank: Union[int, Sequence[int]] = 8,
                 parametrization: Optional[str] = None, order: Optional[int] = 1,
                 alpha: Optional[float] = None, scale: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(base, self.base_type) or type(base) in (nn.ConvTranspose1d,
                                                                 nn.ConvTranspose2d,
                                                                 nn.ConvTranspose3d):
            raise TypeError(f"{type(self).__name__} wraps an nn.{self.base_type.__name__}, "
                            f"got {type(base).__name__}")
        parametrization = parametrization or self.default_parametrization
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, "
                             f"got {parametrization!r}")
        self.base = base
        self.parametrization = parametrization
        self.order = check_order(order)
        self.backend = backend
        w = base.weight
        w.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.ranks = _ranks(rank, w.shape, parametrization)
        r = self.ranks if isinstance(self.ranks, int) else self.ranks[0]
        if scale is not None and alpha is not None:
            raise ValueError("give alpha (scale = alpha / rank) or scale, not both")
        self.scale = check_scale(scale if scale is not None else
                                 (alpha / r if alpha is not None else 1.0))
        kw = dict(dtype=w.dtype, device=w.device)
        if parametrization == "lowrank":
            self.lie_a = nn.Parameter(torch.empty(self.ranks, w[0].numel(), **kw))
            nn.init.kaiming_uniform_(self.lie_a, a=5 ** 0.5)
            self.lie_b = nn.Parameter(torch.zeros(w.shape[0], self.ranks, **kw))
        else:
            self.lie_core = nn.Parameter(torch.zeros(self.ranks, **kw))
            for n, (d, rn) in enumerate(zip(w.shape, self.ranks)):
                # A full-rank factor adds nothing the core cannot hold: use the identity.
                f = None if rn == d else nn.Parameter(_orthonormal(d, rn, **kw))
                self.register_parameter(f"lie_u{n}", f)
        self.register_buffer("lie_merged", torch.zeros((), dtype=torch.bool))
        # mirrors lie_merged (saved in the state_dict): reading a tensor in forward
        # would break torch.compile graphs
        self._merged = False
        #: W' built ahead of forward by ``batch_builds`` (one call for many layers)
        self.prebuilt: Optional[Tensor] = None

    # -- the update ---------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._merged = bool(self.lie_merged)

    def factors(self):
        return [getattr(self, f"lie_u{n}") for n in range(self.base.weight.dim())]

    def adapted_weight(self) -> Tensor:
        """``W ⊙ exp_K(scale · Δ)`` (differentiable in the factors)."""
        w = self.base.weight
        kw = dict(order=self.order, scale=self.scale, backend=self.backend)
        if self.parametrization == "lowrank":
            return lie_weight_lowrank(w, self.lie_a, self.lie_b, **kw)
        return lie_weight(w, self.lie_core, self.factors(), **kw)

    def gemm_args(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(W, u, p)`` with ``Δ_(1) = u @ p``: what the fused op consumes."""
        w = self.base.weight
        if self.parametrization == "lowrank":
            return w, self.lie_b, self.lie_a
        return (w, *tucker_to_gemm(w, self.lie_core, self.factors()))

    def delta(self) -> Tensor:
        """Δ itself, materialised (for merge/unmerge and inspection only)."""
        if self.parametrization == "lowrank":
            return (self.lie_b @ self.lie_a).view(self.base.weight.shape)
        return tucker_einsum(self.lie_core, self.factors())

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        w = self.prebuilt if self.prebuilt is not None else self.adapted_weight()
        return self._apply_weight(x, w)

    def _apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    # -- merge / unmerge (the group action and its inverse) -----------------------
    def _group_element(self) -> Tensor:
        """``exp_K(scale · Δ)`` in fp32 (fp64 for fp64 weights)."""
        cd = compute_dtype(self.base.weight.dtype)
        return exp_series(self.scale * self.delta().to(cd), self.order)

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W ⊙ exp_K(scale·Δ)`` in fp32, cast back; forward then uses the base layer.

        ``unmerge`` divides by the very same fp32 ``exp_K(scale·Δ)``, so the round
        trip costs two roundings of W, whatever the order.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        w = self.base.weight
        e = self._group_element()
        if bool(((e == 0) & (w != 0)).any()):
            raise ValueError(f"cannot merge exactly: exp_{self.order}(scale·Δ) is 0 at some "
                             "entries, so unmerge could not invert it; use an even order "
                             "(strictly positive series) or the exact exp (order=None)")
        w.copy_(w.to(e.dtype) * e)
        self.lie_merged.fill_(True)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with the group inverse: divide by ``exp_K(scale·Δ)`` in fp32."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        w = self.base.weight
        if self.order is None:
            cd = compute_dtype(w.dtype)
            restored = w.to(cd) * torch.exp(-self.scale * self.delta().to(cd))
        else:
            restored = w.to(compute_dtype(w.dtype)) / self._group_element()
        w.copy_(torch.where(w == 0, w, restored.to(w.dtype)))  # zeros never move
        self.lie_merged.fill_(False)
        self._merged = False

    def extra_repr(self) -> str:
        return (f"parametrization={self.parametrization!r}, rank={self.ranks}, "
                f"order={self.order}, scale={self.scale:g}, merged={self.merged}")


class LieLinear(LieLayer):
    base_type = nn.Linear
    default_parametrization = "lowrank"

    def _apply_weight(self, x, weight):
        return nn.functional.linear(x, weight, self.base.bias)


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
