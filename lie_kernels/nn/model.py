"""Model-level helpers: the Lie layers of a model, their weights built in one call,
parameter counts."""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..ops import lie_gemm_many
from .layers import LieLayer


def lie_layers(model: nn.Module) -> Iterator[Tuple[str, LieLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LieLayer))


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
