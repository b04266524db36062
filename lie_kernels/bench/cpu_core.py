"""The CPU path against the naive reference and its compiled form: time and fresh-process
peak memory.

Time: min and median of several forward+backward steps in this process. Memory:
one fresh process per (shape, method) does one forward+backward; we report its
peak resident memory (VmHWM) minus its resident size right after the imports, as
the same way for both. W, the factors and the gradient count in both.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import List, Optional

import torch

import lie_kernels as lk
from lie_kernels.reference import lie_weight_ref

from . import baselines, measure, sweep

CASES = [  # (label, shape, Tucker ranks)
    ("512x512x3x3", (512, 512, 3, 3), (16, 16, 3, 3)),
    ("1280x1280x3x3", (1280, 1280, 3, 3), (16, 16, 3, 3)),
    ("dw1024x1x7x7", (1024, 1, 7, 7), (16, 1, 7, 7)),
    ("64x64x3x3", (64, 64, 3, 3), (8, 8, 3, 3)),
]
NAMES = [c[0] for c in CASES]
ORDER = 4
METHODS = {"ours": "lie_kernels[torch]", "ref": baselines.label("eager"),
           "compiled": baselines.label("compile")}
LEGEND = [
    ("methods", f"ours = {METHODS['ours']} (this library's CPU path); ref = "
     f"{METHODS['ref']} (naive formula, plain autograd); compiled = {METHODS['compiled']} "
     "(inductor, compile time excluded, warm-up first)."),
    ("*_min, *_med", "wall time in ms of one forward+backward, minimum and median over the "
     "repeats. Lower is better."),
    ("x_vs_ref, x_vs_comp", "ref's (compiled's) median / ours' median: > 1 means "
     "lie_kernels is faster. Higher is better."),
    ("ours_MiB, ref_MiB", "peak resident memory of a fresh process doing one step, above its "
     "size after the imports. Lower is better. For the two small weights this is mostly "
     "one-time library buffers."),
    ("mem_ratio", "ours_MiB / ref_MiB: < 1 means lie_kernels needs less. Lower is better."),
]


def _inputs(shape, ranks):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    core = (torch.randn(ranks, generator=gen) * 0.1).requires_grad_()
    factors = [None if (r == d and n) else (torch.randn(d, r, generator=gen) * d ** -0.5)
               .requires_grad_() for n, (d, r) in enumerate(zip(shape, ranks))]
    return w, core, factors


def _step(method, w, core, factors):
    fn = {"ours": lambda *a: lk.lie_weight(*a, order=ORDER, scale=0.5, backend="torch"),
          "ref": lambda *a: lie_weight_ref(*a, ORDER, 0.5),
          "compiled": lambda *a: baselines.compiled("tucker")(*a, ORDER, 0.5)}[method]

    def run():
        fn(w, core, factors).sum().backward()
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


def _cell(v: Optional[float], fmt: str, width: int) -> str:
    return ("-" if v is None else format(v, fmt)).rjust(width)


def run(log=print, shapes: Optional[List[str]] = None, with_compile: bool = True,
        with_memory: bool = True):
    log(f"# CPU path ({METHODS['ours']}) vs {METHODS['ref']}"
        + (f" and {METHODS['compiled']}" if with_compile else "")
        + f": fp32, Tucker, order {ORDER}, forward+backward, {torch.get_num_threads()} threads")
    cols = ["ours_min", "ours_med", "ref_min", "ref_med", "x_vs_ref", "comp_med", "x_vs_comp",
            "ours_MiB", "ref_MiB", "mem_ratio"]
    log(f"{'shape':<15}" + "".join(f"{c:>10}" for c in cols))
    rows, timings = [], {}
    for idx, (label, shape, ranks) in enumerate(CASES):
        if shapes and label not in shapes:
            continue
        args = _inputs(shape, ranks)
        t = {}
        for m in ("ours", "ref", "compiled") if with_compile else ("ours", "ref"):
            try:
                t[m] = measure.time_ms(_step(m, *args), "cpu", reps=9)
            except Exception as exc:  # noqa: BLE001 (only the compiled baseline may fail)
                if m != "compiled":
                    raise
                log(f"# {METHODS[m]} failed on {label}: {sweep.reason(exc)}")
        timings.update({f"{label} {METHODS[m]}": v for m, v in t.items()})
        mem = ({m: _fresh_peak(m, idx) for m in ("ours", "ref")} if with_memory else {})
        comp = t.get("compiled")
        row = dict(shape=label, ours_min=t["ours"].min, ours_med=t["ours"].median,
                   ref_min=t["ref"].min, ref_med=t["ref"].median,
                   x_vs_ref=t["ref"].median / t["ours"].median,
                   comp_med=comp.median if comp else None,
                   x_vs_comp=comp.median / t["ours"].median if comp else None,
                   ours_MiB=mem.get("ours"), ref_MiB=mem.get("ref"),
                   mem_ratio=mem["ours"] / mem["ref"] if mem else None)
        rows.append(row)
        fmts = {"x_vs_ref": ".1f", "x_vs_comp": ".1f", "ours_MiB": ".1f", "ref_MiB": ".1f"}
        log(f"{label:<15}" + "".join(_cell(row[c], fmts.get(c, ".2f"), 10)
                                    for c in cols))
    for line in sweep.legend(LEGEND):
        log(line)
    warning = measure.busy_warning(timings, "cpu")
    if warning:
        log(warning)
    return rows


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
