"""All 53 convs of ResNet-50: one grouped build of every W' against the per-layer loop."""
from __future__ import annotations

import torch
from torch import nn

import lie_kernels as lk

from . import measure, sweep
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


LEGEND = [
    ("methods", "loop = one layer.adapted_weight() call per layer (lie_kernels, backend "
     "'auto'); grouped = one lk.nn.adapted_weights(layers) call for all layers (one grouped "
     "launch on Triton; on CPU the same per-layer math in one call)."),
    ("pass", "fwd = build every W'; fwdbwd = build every W' and backpropagate into all factors."),
    ("*_min, *_med", "wall time in ms for all 53 layers, minimum and median over the repeats. "
     "Lower is better."),
    ("speedup", "loop_med / grouped_med: > 1 means the grouped call is faster. Higher is "
     "better."),
]


def run(device: str, log=print, orders=(1, 4, None)):
    log(f"# multi-layer build: all {len(resnet50_convs())} ResNet-50 convs, Tucker rank 8, "
        f"fp32, {device}; per-layer loop vs one grouped call (lk.nn.adapted_weights)")
    cols = ["loop_min", "loop_med", "grouped_min", "grouped_med", "speedup"]
    log(f"{'order':<7}{'pass':<8}" + "".join(f"{c:>12}" for c in cols))
    rows, timings = [], {}
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
            t_loop = measure.time_ms(loop, device)
            t_grp = measure.time_ms(grouped, device)
            label = "exact" if order is None else str(order)
            timings.update({f"order={label} {mode} loop": t_loop,
                            f"order={label} {mode} grouped": t_grp})
            row = dict(order=label, mode=mode, loop_min=t_loop.min, loop_med=t_loop.median,
                       grouped_min=t_grp.min, grouped_med=t_grp.median,
                       speedup=t_loop.median / t_grp.median)
            rows.append(row)
            log(f"{label:<7}{mode:<8}" + "".join(f"{row[c]:>12.2f}" for c in cols[:-1])
                + f"{row['speedup']:>11.2f}x")
    for line in sweep.legend(LEGEND):
        log(line)
    warning = measure.busy_warning(timings, device)
    if warning:
        log(warning)
    return rows
