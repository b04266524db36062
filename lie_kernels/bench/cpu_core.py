"""The CPU path against the naive reference: time and fresh-process peak memory.

Time: median of several forward+backward steps in this process. Memory: one
fresh process per (shape, method) does one forward+backward; we report its peak
resident memory (VmHWM) minus its resident size right after the imports, as the
core-library issue asks. W, the factors and the gradient count in both.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

import lie_kernels as lk
from lie_kernels.reference import lie_weight_ref

from . import measure

CASES = [  # (label, shape, Tucker ranks)
    ("512x512x3x3", (512, 512, 3, 3), (16, 16, 3, 3)),
    ("1280x1280x3x3", (1280, 1280, 3, 3), (16, 16, 3, 3)),
    ("dw 1024x1x7x7", (1024, 1, 7, 7), (16, 1, 7, 7)),
    ("small 64x64x3x3", (64, 64, 3, 3), (8, 8, 3, 3)),
]
ORDER = 4


def _inputs(shape, ranks):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    core = (torch.randn(ranks, generator=gen) * 0.1).requires_grad_()
    factors = [None if (r == d and n) else (torch.randn(d, r, generator=gen) * d ** -0.5)
               .requires_grad_() for n, (d, r) in enumerate(zip(shape, ranks))]
    return w, core, factors


def _step(method, w, core, factors):
    def run():
        if method == "ours":
            out = lk.lie_weight(w, core, factors, order=ORDER, scale=0.5, backend="torch")
        else:
            out = lie_weight_ref(w, core, factors, ORDER, 0.5)
        out.sum().backward()
    return run


def _child(method: str, idx: int) -> None:
    """Run in a fresh process: print peak RSS above the post-import baseline (MiB)."""
    lk.available_backends()  # the backend registry imports lazily: count it as import
    base = measure._status_mib("VmRSS")
    _, shape, ranks = CASES[idx]
    _step(method, *_inputs(shape, ranks))()
    print(json.dumps({"peak_mib": measure._status_mib("VmHWM") - base}))


def _fresh_peak(method: str, idx: int) -> float:
    out = subprocess.run([sys.executable, "-m", "lie_kernels.bench.cpu_core", method, str(idx)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def run(log=print):
    log(f"# CPU path (torch backend) vs naive eager reference: fp32, Tucker, order {ORDER}, "
        f"forward+backward, {torch.get_num_threads()} threads")
    log(f"{'shape':<18}{'ours ms':>10}{'ref ms':>10}{'speedup':>9}"
        f"{'ours MiB':>10}{'ref MiB':>10}{'mem ratio':>10}")
    rows = []
    for idx, (label, shape, ranks) in enumerate(CASES):
        args = _inputs(shape, ranks)
        t_ours = measure.median_ms(_step("ours", *args), "cpu", reps=9)
        t_ref = measure.median_ms(_step("ref", *args), "cpu", reps=9)
        m_ours, m_ref = _fresh_peak("ours", idx), _fresh_peak("ref", idx)
        row = dict(shape=label, ours_ms=t_ours, ref_ms=t_ref, speedup=t_ref / t_ours,
                   ours_mib=m_ours, ref_mib=m_ref, mem_ratio=m_ours / m_ref)
        rows.append(row)
        log(f"{label:<18}{t_ours:>10.2f}{t_ref:>10.2f}{row['speedup']:>8.1f}x"
            f"{m_ours:>10.1f}{m_ref:>10.1f}{row['mem_ratio']:>10.2f}")
    return rows


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
