"""The microbenchmark sweep: every usable backend against the baselines, side by side."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

import torch

import lie_kernels as lk

from . import baselines, inputs, measure
from .shapes import SWEEP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["case", "shape", "param", "order", "dtype", "pass", "method", "ms",
           "x_vs_eager", "x_vs_compile", "x_vs_hira", "GB/s", "frac_copy_bw", "peak_MiB"]


def usable_backends(device: str, wanted: Optional[List[str]], log) -> List[str]:
    names = []
    for name, (usable, why) in lk.available_backends().items():
        if wanted and name not in wanted:
            continue
        if name == "triton" and device == "cpu":
            log(f"# skipped triton: on CPU it is the Triton interpreter, not a speed path")
        elif not usable:
            log(f"# skipped {name}: {why}")
        else:
            names.append(name)
    return names


def _step(fn, w, args, order, mode, g):
    """One forward (or forward+backward via autograd.grad, so nothing accumulates)."""
    def step():
        out = fn(w, *args, order, 0.5)
        if mode == "fwdbwd":
            torch.autograd.grad(out, inputs.leaves(args), g)
        return out
    return step


def _ours(backend, parametrization):
    api = lk.lie_weight if parametrization == "tucker" else lk.lie_weight_lowrank
    return lambda w, x, y, order, scale: api(w, x, y, order=order, scale=scale,
                                            backend=backend)


def _cases(device, cases, params, orders, dtypes, modes, backends, with_compile):
    """Yield (key, {method: step}) for every benchmark point, inputs made on the fly."""
    for case in [c for c in SWEEP if c.name in cases]:
        for param in params:
            for dtype_name in dtypes:
                w, args = inputs.make(case, param, DTYPES[dtype_name], device)
                g = torch.randn_like(w)
                for order in orders:
                    for mode in modes:
                        methods = {be: _ours(be, param) for be in backends}
                        methods.update(baselines.baseline_fns(param, order, with_compile))
                        key = (case, param, dtype_name, order, mode, w.numel() * w.element_size())
                        yield key, {m: _step(fn, w, args, order, mode, g)
                                    for m, fn in methods.items()}


def run(device: str, cases: List[str], params: List[str], orders: List[Optional[int]],
        dtypes: List[str], modes: List[str], backends: List[str], with_compile: bool,
        with_memory: bool, log=print) -> List[Dict]:
    """Time every point first, then (``with_memory``) measure peak memory in a second
    pass: the CPU memory probe changes the allocator's behaviour for what follows."""
    copy_bw = measure.copy_bandwidth_gbs(device)
    log(f"# device {device}: copy bandwidth {copy_bw:.1f} GB/s (read+write), measured now")
    spec = (device, cases, params, orders, dtypes, modes, backends, with_compile)
    rows = []
    for (case, param, dtype_name, order, mode, wbytes), steps in _cases(*spec):
        res = {m: measure.median_ms(step, device) for m, step in steps.items()}
        nbytes = (2 if mode == "fwd" else 4) * wbytes  # bytes floor: see DESIGN.md
        for label, ms in res.items():
            gbs = nbytes / (ms * 1e-3) / 1e9
            row = dict(case=case.name, shape="x".join(map(str, case.shape)), param=param,
                       order="exact" if order is None else order, dtype=dtype_name,
                       **{"pass": mode}, method=label, ms=float(f"{ms:.4g}"),
                       **{"GB/s": float(f"{gbs:.3g}")},
                       frac_copy_bw=float(f"{gbs / copy_bw:.3g}"), peak_MiB=None)
            for base in ("eager", "compile", "hira"):
                row[f"x_vs_{base}"] = float(f"{res[base] / ms:.3g}") if base in res else None
            rows.append(row)
            if not with_memory:
                log(_fmt(row))
    if with_memory:
        it = iter(rows)
        for _, steps in _cases(*spec):
            for label, step in steps.items():
                row = next(it)
                peak = measure.peak_mib(step, device)
                row["peak_MiB"] = None if peak is None else round(peak, 2)
                log(_fmt(row))
    return rows


def header() -> str:
    return _fmt({c: c for c in COLUMNS})


def _fmt(row: Dict) -> str:
    widths = [24, 13, 7, 5, 5, 6, 8, 9, 10, 12, 9, 8, 12, 9]
    return " ".join(str("-" if row.get(c) is None else row[c]).rjust(wd)[:max(wd, 1)]
                    if i else str(row[c]).ljust(wd) for i, (c, wd) in
                    enumerate(zip(COLUMNS, widths)))


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows(rows)


def plot(rows: List[Dict], path: str, backends: List[str], title: str) -> None:
    """Bars: speedup over the eager reference per case, one bar per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["case"], r["param"], str(r["order"]), r["dtype"], r["pass"])
                     for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(labels) * len(backends)), 5))
    width = 0.8 / max(1, len(backends))
    for i, be in enumerate(backends):
        vals = []
        for lab in labels:
            hit = [r["x_vs_eager"] for r in rows if r["method"] == be and
                   (r["case"], r["param"], str(r["order"]), r["dtype"], r["pass"]) == lab]
            vals.append(hit[0] if hit else 0)
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=be)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels([" ".join(lab) for lab in labels], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager reference (x)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
