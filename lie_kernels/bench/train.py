"""One optimizer step of a small ConvNeXt-style net: LieRA orders vs LoRA vs full FT.

The paper measured the exact exp at +52% step time and +48% memory over order 1
(ConvNeXt-V2-B); this reports the same two ratios for our kernels.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import torch
from torch import nn
from torch.nn import functional as F

import lie_kernels as lk

from . import measure


class Block(nn.Module):
    """ConvNeXt block: depthwise 7x7, LayerNorm (as GroupNorm(1)), 1x1 MLP, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.pw1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pw2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        return x + self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))


class ConvNeXtTiny(nn.Module):
    def __init__(self, dims=(64, 128, 256), depth=2, classes=100):
        super().__init__()
        layers, c_in = [nn.Conv2d(3, dims[0], 4, stride=4)], dims[0]
        for i, d in enumerate(dims):
            if i:
                layers += [nn.GroupNorm(1, c_in), nn.Conv2d(c_in, d, 2, stride=2)]
            layers += [Block(d) for _ in range(depth)]
            c_in = d
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class LoRAConv(nn.Module):
    """LoRA-style conv adapter: ``W + s·(B @ A).view(W.shape)``, plain PyTorch."""

    def __init__(self, conv: nn.Conv2d, rank: int = 8):
        super().__init__()
        self.conv = conv.requires_grad_(False)
        w = conv.weight
        self.a = nn.Parameter(torch.randn(rank, w[0].numel(), device=w.device) / w[0].numel() ** 0.5)
        self.b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))

    def forward(self, x):
        w = self.conv.weight + (self.b @ self.a).view(self.conv.weight.shape)
        return self.conv._conv_forward(x, w, self.conv.bias)


def _lora(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(mod, cname, LoRAConv(child))
    model.head.requires_grad_(True)
    return model


def configs(base: nn.Module):
    """(label, model) pairs; LieRA adapts every conv with Tucker rank 8."""
    yield "full fine-tune", copy.deepcopy(base).requires_grad_(True)
    yield "LoRA conv r=8", _lora(copy.deepcopy(base))
    for order in (1, 4, None):
        m = lk.inject(copy.deepcopy(base), target_modules=[nn.Conv2d], rank=8, order=order)
        yield f"LieRA order={'exact' if order is None else order}", m


def _setup(device: str, batch: int, size: int):
    torch.manual_seed(0)
    base = ConvNeXtTiny().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    return base, x, y


def _stepper(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _cpu_peak(index: int, batch: int, size: int) -> float:
    """Peak RSS of one step in a fresh process (above its RSS once model and data exist):
    in this process freed heap pages would hide the step's allocations."""
    out = subprocess.run([sys.executable, "-m", "lie_kernels.bench.train", str(index),
                          str(batch), str(size)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def run(device: str, log=print, batch: int = None, size: int = 64):
    batch = batch or (64 if device == "cuda" else 8)
    base, x, y = _setup(device, batch, size)
    log(f"# training step: ConvNeXt-style net, batch {batch}, {size}x{size}, SGD, {device}"
        + ("; CPU peak memory from a fresh process per config" if device == "cpu" else ""))
    log(f"{'config':<20}{'trainable':>11}{'step ms':>10}{'peak MiB':>10}"
        f"{'time/ord1':>10}{'mem/ord1':>10}")
    rows = []
    for i, (label, model) in enumerate(configs(base)):
        step = _stepper(model, x, y)
        ms = measure.median_ms(step, device, reps=5)
        peak = (measure.peak_mib(step, device) if device == "cuda"
                else _cpu_peak(i, batch, size))
        rows.append(dict(config=label, trainable=lk.trainable_parameters(model)[0], ms=ms,
                         peak=peak))
    ref = next(r for r in rows if r["config"] == "LieRA order=1")
    for r in rows:
        log(f"{r['config']:<20}{r['trainable']:>11}{r['ms']:>10.2f}{r['peak']:>10.1f}"
            f"{r['ms'] / ref['ms']:>10.2f}{r['peak'] / ref['peak']:>10.2f}")
    return rows


if __name__ == "__main__":
    idx, bsz, sz = map(int, sys.argv[1:4])
    model_base, xs, ys = _setup("cpu", bsz, sz)
    model = list(configs(model_base))[idx][1]
    one_step = _stepper(model, xs, ys)
    start = measure._status_mib("VmRSS")
    one_step()
    print(measure._status_mib("VmHWM") - start)
