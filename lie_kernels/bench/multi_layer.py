"""All 53 convs of ResNet-50: one grouped build of every W' against the per-layer loop."""
from __future__ import annotations

import torch
from torch import nn

import lie_kernels as lk

from . import measure
from .shapes import resnet50_convs


def _layers(device: str, order):
    torch.manual_seed(0)
    layers = []
    for shape in resnet50_convs():
        conv = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False).to(device)
        layer = lk.nn.LieConv2d(conv, rank=8, order=order)
        with torch.no_grad():
            layer.lie_core.normal_(0, 0.1)
        layers.append(layer)
    return layers


def run(device: str, log=print, orders=(1, 4, None)):
    log(f"# multi-layer build: all {len(resnet50_convs())} ResNet-50 convs, Tucker rank 8, "
        f"fp32, {device}; per-layer loop vs one grouped call (lk.nn.adapted_weights)")
    log(f"{'order':<7}{'pass':<8}{'loop ms':>10}{'grouped ms':>12}{'speedup':>9}")
    rows = []
    for order in orders:
        layers = _layers(device, order)
        params = [p for m in layers for p in m.parameters() if p.requires_grad]
        for mode in ("fwd", "fwdbwd"):
            def loop():
                ws = [m.adapted_weight() for m in layers]
                if mode == "fwdbwd":
                    torch.autograd.grad(ws, params, [torch.ones_like(w) for w in ws])

            def grouped():
                ws = lk.nn.adapted_weights(layers)
                if mode == "fwdbwd":
                    torch.autograd.grad(ws, params, [torch.ones_like(w) for w in ws])
            t_loop = measure.median_ms(loop, device)
            t_grp = measure.median_ms(grouped, device)
            label = "exact" if order is None else str(order)
            rows.append(dict(order=label, mode=mode, loop_ms=t_loop, grouped_ms=t_grp))
            log(f"{label:<7}{mode:<8}{t_loop:>10.2f}{t_grp:>12.2f}{t_loop / t_grp:>8.2f}x")
    return rows
