"""Weight shapes of real models, as the benchmarks sweep them.

Each case: (name, weight shape, Tucker ranks, low-rank rank). Tucker ranks are
16 on the channel modes and full (identity factor) on the spatial modes.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple


class Case(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    ranks: Tuple[int, ...]
    rank: int = 16


def _conv(name: str, c_out: int, c_in: int, k: int) -> Case:
    return Case(name, (c_out, c_in, k, k), (min(16, c_out), min(16, c_in), k, k))


SWEEP: List[Case] = [
    _conv("resnet50.3x3.64", 64, 64, 3),
    _conv("resnet50.3x3.256", 256, 256, 3),
    _conv("resnet50.3x3.512", 512, 512, 3),
    _conv("resnet50.1x1.256-64", 256, 64, 1),
    _conv("resnet50.1x1.1024-256", 1024, 256, 1),
    _conv("resnet50.1x1.2048-512", 2048, 512, 1),
    _conv("convnextv2b.dw7x7.128", 128, 1, 7),
    _conv("convnextv2b.dw7x7.512", 512, 1, 7),
    _conv("convnextv2b.dw7x7.1024", 1024, 1, 7),
    _conv("sd15.3x3.320", 320, 320, 3),
    _conv("sd15.3x3.640", 640, 640, 3),
    _conv("sd15.3x3.1280", 1280, 1280, 3),
    Case("linear.4096x4096", (4096, 4096), (16, 16)),
    Case("linear.11008x4096", (11008, 4096), (16, 16)),
]

#: the default on a CPU: one shape per family, small enough for a two-minute run
CPU_DEFAULT = ["resnet50.3x3.256", "resnet50.1x1.1024-256", "convnextv2b.dw7x7.1024",
               "sd15.3x3.640", "linear.4096x4096"]
#: --quick: a 3x3 conv and a 1x1 conv (a Linear-shaped matrix) of the CPU default, the
#: sizes at which a smoke test of every method takes seconds
QUICK = ["resnet50.3x3.256", "resnet50.1x1.1024-256"]


def resnet50_convs() -> List[Tuple[int, ...]]:
    """Weight shapes of all 53 convs of ResNet-50 (torchvision layout), stem included."""
    shapes = [(64, 3, 7, 7)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, c_in, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                shapes.append((width * 4, c_in, 1, 1))  # downsample
            c_in = width * 4
    return shapes
