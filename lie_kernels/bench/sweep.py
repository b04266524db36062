"""The microbenchmark sweep: every usable backend against the baselines, side by side."""
from __future__ import annotations

import csv
import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import lie_kernels as lk

from . import baselines, inputs, measure, roofline
from .shapes import SWEEP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["case", "shape", "param", "order", "dtype", "pass", "method", "ms_min", "ms_median",
           "x_vs_eager", "x_vs_compile", "x_vs_hira", "GB/s", "frac_copy_bw", "pred_ms",
           "pred_frac", "peak_MiB"]
#: table width of each column (a column missing here gets 10)
WIDTHS = {"case": 24, "shape": 13, "param": 7, "order": 5, "dtype": 5, "pass": 6,
          "method": 24, "ms_min": 9, "ms_median": 9, "x_vs_eager": 10, "x_vs_compile": 12,
          "x_vs_hira": 9, "GB/s": 8, "frac_copy_bw": 12, "pred_ms": 9, "pred_frac": 9,
          "peak_MiB": 9}
#: printed under the table: what each column compares and which direction is better
LEGEND = [
    ("method", "lie_kernels[<backend>] = this library's fused op on that backend; "
     "eager reference = the naive formula of lie_kernels.reference with plain autograd; "
     "torch.compile(reference) = that formula compiled by torch.compile (inductor; compile "
     "time excluded, warm-up calls first); PEFT HiRA formula = W + W*(s*B@A) in plain "
     "PyTorch (order 1, low-rank only)."),
    ("pass", "fwd = build W' = W*exp_K(s*Delta); fwdbwd = build W' and backpropagate a "
     "random gradient into the factors."),
    ("ms_min, ms_median", "wall time of one step, minimum and median over the repeats. "
     "Lower is better. median/min > %.1f means a busy machine (a warning follows)."
     % measure.BUSY_SPREAD),
    ("x_vs_eager, x_vs_compile, x_vs_hira", "that baseline's median time / this row's median "
     "time at the same point: > 1 means this row is faster (higher is better), 1.0 on the "
     "baseline's own row. '-' = that baseline does not apply here (HiRA: order 1 low-rank "
     "only) or was switched off (--no-compile); 'n/a' = it failed to run (reason above)."),
    ("GB/s", "bytes floor / median time; floor = 2 passes over W for fwd (read W, write W'), "
     "4 for fwdbwd (also read the gradient and W). Higher is better."),
    ("frac_copy_bw", "GB/s / this device's copy bandwidth measured at the start of the run; "
     "1.0 is the memory-bound ceiling. Higher is better."),
    ("pred_ms, pred_frac", "Triton rows on a GPU: the H200 roofline prediction "
     "(python -m lie_kernels.bench roofline) of this step's time and of its fraction of the "
     "memory floor; measured/predicted is what a GPU run checks. '-' elsewhere."),
    ("peak_MiB", "most tensor memory live at once during one step, above what was live "
     "before it (W, the factors and the gradient are inputs, not counted). CUDA: "
     "torch.cuda.max_memory_allocated; CPU: PyTorch's CPU allocator events recorded by "
     "torch.profiler (memory that MKL/oneDNN allocate on their own is not seen). Lower is "
     "better. '-' = --no-memory; 'n/a' = this torch cannot record it."),
]


def usable_backends(device: str, wanted: Optional[List[str]], log) -> List[str]:
    names = []
    for name, (usable, why) in lk.available_backends().items():
        if wanted and name not in wanted:
            continue
        if name == "triton" and device == "cpu":
            log("# skipped triton: on CPU it is the Triton interpreter, not a speed path")
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


def _prediction(method, device, case, param, dtype_name, order, mode) -> Dict:
    """The H200 roofline of the Triton kernels (bench/roofline.py) beside a measured
    Triton time on a GPU: predicted ms and predicted fraction of the memory floor."""
    if method != "triton" or device != "cuda":
        return dict(pred_ms=None, pred_frac=None)
    p = roofline.predict_mode(case.shape, case.rank if param == "lowrank" else case.ranks[0],
                              dtype_name, order, mode)
    return dict(pred_ms=float(f"{p['time_us'] / 1e3:.4g}"),
                pred_frac=float(f"{p['frac_floor']:.3g}"))


def reason(exc: BaseException) -> str:
    """One line saying why a method failed."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def run(device: str, cases: List[str], params: List[str], orders: List[Optional[int]],
        dtypes: List[str], modes: List[str], backends: List[str], with_compile: bool,
        with_memory: bool, log=print) -> Tuple[List[Dict], List[str]]:
    """Time every method at every point, then measure its peak memory; log one row each.
    Returns the rows and the run's caveats (the warnings logged after the table, which
    the plot repeats).

    Only ``torch.compile(reference)`` may fail (no C++ compiler, an unsupported
    op): its reason is logged and its cells read 'n/a'.
    """
    copy_bw = measure.copy_bandwidth_gbs(device)
    log(f"# device {device}: copy bandwidth {copy_bw:.1f} GB/s (read+write), measured now")
    log(header())
    spec = (device, cases, params, orders, dtypes, modes, backends, with_compile)
    rows, timings, failures = [], {}, 0
    for (case, param, dtype_name, order, mode, wbytes), steps in _cases(*spec):
        res, failed = {}, set()
        for m, step in steps.items():
            try:
                res[m] = measure.time_ms(step, device)
            except Exception as exc:  # noqa: BLE001 (only the compiled baseline may fail)
                if m != "compile":
                    raise
                failed.add(m)
                failures += 1
                log(f"# {baselines.label(m)} failed on {case.name} {param} order={order} "
                    f"{dtype_name} {mode}: {reason(exc)}")
        # bytes floor: forward reads W, writes W'; backward reads g and W (2 passes more)
        nbytes = (2 if mode == "fwd" else 4) * wbytes
        for m, t in res.items():
            gbs = nbytes / (t.median * 1e-3) / 1e9
            row = dict(case=case.name, shape="x".join(map(str, case.shape)), param=param,
                       order="exact" if order is None else order, dtype=dtype_name,
                       **{"pass": mode}, method=baselines.label(m),
                       ms_min=float(f"{t.min:.4g}"), ms_median=float(f"{t.median:.4g}"),
                       **{"GB/s": float(f"{gbs:.3g}")},
                       frac_copy_bw=float(f"{gbs / copy_bw:.3g}"), peak_MiB=None,
                       **_prediction(m, device, case, param, dtype_name, order, mode))
            for base in ("eager", "compile", "hira"):
                row[f"x_vs_{base}"] = ("n/a" if base in failed else
                                       float(f"{res[base].median / t.median:.3g}")
                                       if base in res else None)
            if with_memory:
                peak = measure.peak_mib(steps[m], device)
                row["peak_MiB"] = "n/a" if peak is None else round(peak, 2)
            timings[f"{case.name} {param} order={row['order']} {dtype_name} {mode} "
                    f"{row['method']}"] = t
            rows.append(row)
            log(_fmt(row))
    for line in legend():
        log(line)
    caveats = [measure.busy_warning(timings, device)]
    if failures:
        caveats.append(f"# WARNING: {baselines.label('compile')} failed at {failures} "
                       "points (reasons in sweep.txt): its bars are missing there.")
    caveats = [c for c in caveats if c]
    for line in caveats:
        log(line)
    return rows, caveats


def legend(entries=None, width: int = 100) -> List[str]:
    """``# ``-prefixed lines: one wrapped paragraph per (column, meaning)."""
    lines = ["# legend:"]
    for name, text in entries or LEGEND:
        lines += textwrap.wrap(f"{name}: {text}", width, initial_indent="#   ",
                               subsequent_indent="#       ")
    return lines


def header() -> str:
    return _fmt({c: c for c in COLUMNS})


def _fmt(row: Dict) -> str:
    cells = []
    for i, c in enumerate(COLUMNS):
        wd = WIDTHS.get(c, 10)
        val = "-" if row.get(c) is None else str(row[c])
        cells.append(val.rjust(wd) if i else val.ljust(wd))
    return " ".join(cells)


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows(rows)


def _point(r: Dict) -> str:
    return f"{r['case']} {r['param']} o={r['order']} {r['dtype']} {r['pass']}"


#: printed under the plot, one line each: how its rows and bars read (the PNG travels
#: without the table and its legend)
PLOT_LEGEND = [
    "rows: <case> <param> o=<order> <dtype> <pass>",
    "case: <model>.<kernel>.<channels>: resnet50.3x3.256 = a 3x3 conv of ResNet-50, 256 "
    "channels in and out; 1x1.1024-256 = 1024 out, 256 in; dw7x7 = depthwise; "
    "linear.<out>x<in> = a Linear weight",
    "param: tucker = Tucker core and factors, lowrank = B@A;   o= : the order K of the series "
    "exp_K (exact = exp);   dtype: W's;   pass: fwd = build W' = W*exp_K(s*Delta), fwdbwd = "
    "build W' and backpropagate into the factors",
    "lie_kernels[<backend>] = this library's fused op on that backend (torch: plain PyTorch "
    "ops);   eager reference = the naive formula with plain autograd (the dashed 1x line)",
    "torch.compile(reference) = that formula compiled by inductor;   PEFT HiRA formula = "
    "W + W*(s*B@A) (lowrank o=1 only)",
    "bars: this method / the eager reference on the same row, log axis: left of 1x = faster "
    "or less memory;   hatched = a noisy timing (median/min > %.1f here or in the eager "
    "reference's row): do not quote it" % measure.BUSY_SPREAD,
]


def _noisy(r: Dict) -> bool:
    return r["ms_median"] > measure.BUSY_SPREAD * r["ms_min"]


def _log_ticks(ax, xs: List[float]) -> None:
    """Ticks at 1, 2, 5 x 10^k over up to two decades, 1, 3 x 10^k up to five, 10^k
    beyond: labelled without overlapping."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    lo, hi = min(xs + [1.0]), max(xs + [1.0])
    decades = math.log10(hi / lo)
    subs = (1, 2, 5) if decades <= 2 else (1, 3) if decades <= 5 else (1,)
    ax.xaxis.set_major_locator(LogLocator(subs=subs, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 2.5, hi * 2.5)  # room for the value printed at a bar's end


def figure(rows: List[Dict], run_line: str, quick: bool, caveats: Sequence[str] = ()):
    """Two panels, log axes: median time and peak memory of every method relative to the
    eager reference, one labelled bar per method and row, under a header with the run's
    mode, device and caveats and over a legend of the rows and names."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    eager = baselines.label("eager")
    points = list(dict.fromkeys(_point(r) for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != eager]
    by = {(_point(r), r["method"]): r for r in rows}
    compiled = any(r["method"] == baselines.label("compile") for r in rows)
    warn = ["--quick: a smoke test, not a measurement: a few cases, few repeats on CPU"
            + ("" if compiled else ", torch.compile(reference) skipped")
            + "; run without --quick before quoting any ratio."] if quick else []
    warn += [c.lstrip("# ") for c in caveats]
    header = ([(f"lie_kernels sweep, {'QUICK run (--quick)' if quick else 'full run'}: time "
                "and peak memory relative to the eager reference", 11, "k", "bold"),
               (run_line, 8, "k", "normal")]
              + [(ln, 9, "firebrick", "bold") for c in warn for ln in textwrap.wrap(c, 170)])
    footer = [(ln, 7.5, "k", "normal") for p in PLOT_LEGEND for ln in textwrap.wrap(p, 230)]

    def inches(lines):
        return sum(size * 1.45 / 72 for _, size, _, _ in lines)
    width, body = 14.0, max(2.0, 0.16 * len(points) * max(1, len(methods)))
    top, bottom = inches(header) + 0.5, inches(footer) + 0.95  # + panel titles, x labels
    height = top + body + bottom
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, 2, sharey=True)
    left = 0.3 + 0.055 * max(map(len, points), default=0)  # the 7 pt row labels
    fig.subplots_adjust(left=left / width, right=0.98, top=1 - top / height,
                        bottom=bottom / height, wspace=0.08)
    for lines, y in ((header, height - 0.1), (footer, inches(footer) + 0.1)):
        for text, size, color, weight in lines:
            fig.text(0.01, y / height, text, fontsize=size, color=color, weight=weight,
                     va="top")
            y -= size * 1.45 / 72

    bar = 0.8 / max(1, len(methods))
    panels = (("ms_median", "median time", "median time / eager reference's  (< 1x: faster)"),
              ("peak_MiB", "peak tensor memory",
               "peak tensor memory / eager reference's  (< 1x: less)"))
    for ax, (col, title, xlabel) in zip(axes, panels):
        every = []
        for i, m in enumerate(methods):
            ys, xs, noisy = [], [], []
            for j, p in enumerate(points):
                r, base = by.get((p, m)), by.get((p, eager))
                if r and base and all(isinstance(v, float) and v > 0
                                      for v in (r[col], base[col])):
                    ys.append(j + i * bar)
                    xs.append(r[col] / base[col])
                    noisy.append(col == "ms_median" and (_noisy(r) or _noisy(base)))
            bars = ax.barh(ys, [x - 1 for x in xs], bar, left=1, color=f"C{i}")
            for b, x, n in zip(bars, xs, noisy):
                if n:
                    b.set_hatch("////")
                ax.text(x, b.get_y() + bar / 2, f" {x:.2g}x " if x < 10 else f" {x:.0f}x ",
                        ha="left" if x >= 1 else "right", va="center", fontsize=6)
            every += xs
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        _log_ticks(ax, every)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks([j + 0.4 - bar / 2 for j in range(len(points))])
    axes[0].set_yticklabels(points, fontsize=7)
    axes[0].invert_yaxis()
    # own patches: a method's first bar may be hatched, and a legend copies that
    handles = [Patch(color=f"C{i}", label=m) for i, m in enumerate(methods)]
    handles.append(Patch(facecolor="white", edgecolor="k", hatch="////",
                         label=f"noisy timing (median/min > {measure.BUSY_SPREAD})"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, (inches(footer) + 0.15) / height), frameon=False)
    return fig


def plot(rows: List[Dict], path: str, run_line: str, quick: bool,
         caveats: Sequence[str] = ()) -> None:
    """Write :func:`figure` as a PNG."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure(rows, run_line, quick, caveats).savefig(path, dpi=110)
