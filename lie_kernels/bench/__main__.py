"""``python -m lie_kernels.bench [sweep|cpu-core|train|multi] [flags]``.

``sweep`` (the default) times every usable backend against the eager
reference, ``torch.compile`` of it and PEFT HiRA's formula on real model
shapes, and writes a table, a CSV and a PNG under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

import lie_kernels as lk

from . import measure, sweep
from .shapes import CPU_DEFAULT, SWEEP


def _list(s):
    return [x for x in s.split(",") if x]


def _orders(s):
    return [None if x == "exact" else int(x) for x in _list(s)]


def _device_line(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device} "
            f"({name}), torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}, "
            f"lie_kernels {lk.__version__}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lie_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="sweep",
                    choices=["sweep", "cpu-core", "train", "multi"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list or 'all' (default on CPU: {','.join(CPU_DEFAULT)})")
    ap.add_argument("--params", default="tucker,lowrank")
    ap.add_argument("--orders", default=None, help="e.g. 1,2,4,exact")
    ap.add_argument("--dtypes", default=None, help="fp32,bf16,fp16")
    ap.add_argument("--passes", default=None, help="fwd,fwdbwd")
    ap.add_argument("--backends", default=None, help="default: every usable one")
    ap.add_argument("--compile", dest="with_compile", action=argparse.BooleanOptionalAction,
                    default=None, help="torch.compile baseline (default: on for CUDA only; "
                    "on CPU each shape/order costs ~20 s of compilation)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="bench/results/local")
    ap.add_argument("--quick", action="store_true",
                    help="minimal repeats and sizes (a smoke test, not a measurement)")
    a = ap.parse_args(argv)
    if a.quick:
        measure.EFFORT.update(warmup=1, max_reps=3, budget_s=0.2)
    gpu = a.device == "cuda"
    os.makedirs(a.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(_device_line(a.device))
    if a.command == "cpu-core":
        from . import cpu_core
        cpu_core.run(log)
    elif a.command == "train":
        from . import train
        train.run(a.device, log, **({"batch": 2, "size": 32} if a.quick else {}))
    elif a.command == "multi":
        from . import multi_layer
        multi_layer.run(a.device, log, orders=(1,) if a.quick else (1, 4, None))
    else:
        cases = (CPU_DEFAULT if not gpu and a.shapes is None else
                 [c.name for c in SWEEP] if a.shapes in (None, "all") else _list(a.shapes))
        orders = _orders(a.orders or ("1,2,4,exact" if gpu else "1,4,exact"))
        dtypes = _list(a.dtypes or ("fp32,bf16" if gpu else "fp32"))
        passes = _list(a.passes or ("fwd,fwdbwd" if gpu else "fwdbwd"))
        with_compile = gpu if a.with_compile is None else a.with_compile
        backends = sweep.usable_backends(a.device, a.backends and _list(a.backends), log)
        log(f"# shapes={','.join(cases)} params={a.params} orders={orders} dtypes={dtypes} "
            f"passes={passes} compile={with_compile}")
        log(sweep.header())
        rows = sweep.run(a.device, cases, _list(a.params), orders, dtypes, passes, backends,
                         with_compile, a.memory, log)
        sweep.write_csv(rows, os.path.join(a.out, "sweep.csv"))
        sweep.plot(rows, os.path.join(a.out, "sweep.png"), backends, lines[0].lstrip("# "))
        log(f"# wrote {a.out}/sweep.csv and {a.out}/sweep.png")
    with open(os.path.join(a.out, f"{a.command}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
