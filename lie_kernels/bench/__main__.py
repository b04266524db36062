"""``python -m lie_kernels.bench [sweep|cpu-core|train|multi|roofline|linear] [flags]``.

Each subcommand prints a table with a legend under it and writes
``<command>.txt`` under ``--out``; ``<command> --help`` lists its flags. Without a
subcommand, ``sweep`` runs (``python -m lie_kernels.bench --quick`` is the sweep).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import lie_kernels as lk

from . import cpu_core, measure, sweep
from .shapes import CPU_DEFAULT, QUICK, SWEEP

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _choices_list(valid, name, extra=()):
    """argparse type: a comma list whose items must be in ``valid`` (or ``extra``)."""
    def parse(s):
        items = [x for x in s.split(",") if x]
        bad = [x for x in items if x not in valid and x not in extra]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {','.join(bad) or repr(s)}; valid: "
                f"{', '.join(list(extra) + list(valid))}")
        return items
    return parse


def _orders(s):
    try:
        orders = [None if x == "exact" else int(x) for x in s.split(",") if x]
    except ValueError:
        orders = [-1]
    if not orders or any(o is not None and o < 0 for o in orders):
        raise argparse.ArgumentTypeError(
            f"bad orders {s!r}; valid: comma list of integers >= 0 and 'exact', e.g. 1,4,exact")
    return orders


def _positive_int(s):
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return n


# -- shared flags ------------------------------------------------------------------------

def _common(p, writes, quick, device=True):
    """The flags every subcommand takes; ``writes``: its files under --out; ``quick``:
    what --quick cuts."""
    if device:
        p.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULT_DEVICE,
                       help=f"where to run (default here: {DEFAULT_DEVICE})")
    p.add_argument("--out", default="bench/results/local", metavar="DIR",
                   help=f"folder for {writes}; default: %(default)s (git-ignored)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test of the command, not a measurement: {quick}")


def _compile_flag(p, text):
    """--compile/--no-compile, on unless --quick (compiling dwarfs a smoke test)."""
    p.add_argument("--compile", dest="with_compile", action=argparse.BooleanOptionalAction,
                   default=None, help=f"{text} (default: on; off with --quick)")


# -- sweep -------------------------------------------------------------------------------

def _sweep_args(p):
    _common(p, "sweep.txt (the table), sweep.csv and sweep.png (the plot)",
            f"cases {' and '.join(QUICK)}, orders 1 and exact, fp32, fwdbwd, 3 repeats on "
            "CPU, torch.compile(reference) off; flags given explicitly still apply")
    names = [c.name for c in SWEEP]
    p.add_argument("--shapes", type=_choices_list(names, "shape", extra=("all",)),
                   metavar="LIST", help="comma list of cases, or 'all'; default on CPU: "
                   f"{', '.join(CPU_DEFAULT)}; on CUDA: all; --quick: {', '.join(QUICK)}. "
                   f"Cases: {', '.join(names)}")
    p.add_argument("--params", type=_choices_list(["tucker", "lowrank"], "parametrization"),
                   default=["tucker", "lowrank"], metavar="LIST",
                   help="parametrizations of the update: tucker, lowrank (default: both)")
    p.add_argument("--orders", type=_orders, metavar="LIST",
                   help="series orders, integers >= 0 or 'exact' (default: 1,4,exact on CPU, "
                   "1,2,4,exact on CUDA)")
    p.add_argument("--dtypes", type=_choices_list(list(sweep.DTYPES), "dtype"), metavar="LIST",
                   help="weight dtypes: fp32, bf16, fp16 (default: fp32 on CPU, fp32,bf16 on "
                   "CUDA)")
    p.add_argument("--passes", type=_choices_list(["fwd", "fwdbwd"], "pass"), metavar="LIST",
                   help="fwd (build W') and/or fwdbwd (build W' and backpropagate) (default: "
                   "fwdbwd on CPU, fwd,fwdbwd on CUDA)")
    p.add_argument("--backends", type=_choices_list(list(lk.available_backends()), "backend"),
                   metavar="LIST", help="lie_kernels backends to time (default: every usable "
                   "one; triton is skipped on CPU, where it is only the interpreter)")
    _compile_flag(p, "also time torch.compile(reference) (inductor; compile time excluded; "
                  "on CPU about 3 s of compilation per shape and order, 15 s for the first)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each method's peak tensor memory (see the legend)")


def _sweep_plan(a):
    """(cases, orders, dtypes, passes): the flags given, else the defaults of the device
    (and of --quick)."""
    gpu = a.device == "cuda"
    if a.shapes is None:
        cases = QUICK if a.quick else CPU_DEFAULT if not gpu else [c.name for c in SWEEP]
    else:
        cases = [c.name for c in SWEEP] if "all" in a.shapes else a.shapes
    orders = a.orders or ([1, None] if a.quick else [1, 2, 4, None] if gpu else [1, 4, None])
    dtypes = a.dtypes or (["fp32", "bf16"] if gpu and not a.quick else ["fp32"])
    passes = a.passes or (["fwd", "fwdbwd"] if gpu and not a.quick else ["fwdbwd"])
    return cases, orders, dtypes, passes


def _quick_line(a) -> str:
    return ("# --quick: a smoke test, not a measurement (few repeats on CPU"
            + ("" if a.with_compile else "; torch.compile(reference) skipped, --compile "
               "times it") + ")")


def _run_sweep(a, log):
    cases, orders, dtypes, passes = _sweep_plan(a)
    if a.quick:
        log(_quick_line(a))
    backends = sweep.usable_backends(a.device, a.backends, log)
    log(f"# shapes={','.join(cases)} params={','.join(a.params)} "
        f"orders={','.join('exact' if o is None else str(o) for o in orders)} "
        f"dtypes={','.join(dtypes)} passes={','.join(passes)} compile={a.with_compile}")
    rows, caveats = sweep.run(a.device, cases, a.params, orders, dtypes, passes, backends,
                              a.with_compile, a.memory, log)
    sweep.write_csv(rows, os.path.join(a.out, "sweep.csv"))
    sweep.plot(rows, os.path.join(a.out, "sweep.png"), measure.device_line(a.device).lstrip("# "),
               a.quick, caveats)
    log(f"# wrote {a.out}/sweep.csv and {a.out}/sweep.png")


# -- cpu-core ----------------------------------------------------------------------------

def _cpu_core_args(p):
    _common(p, "cpu-core.txt (the table)", f"{cpu_core.NAMES[-1]} only, 3 repeats, "
            "torch.compile(reference) off; flags given explicitly still apply", device=False)
    p.add_argument("--shapes", type=_choices_list(cpu_core.NAMES, "shape"), metavar="LIST",
                   help=f"comma list of cases (default: all; --quick: {cpu_core.NAMES[-1]}): "
                   f"{', '.join(cpu_core.NAMES)}")
    _compile_flag(p, "also time torch.compile(reference)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory in a fresh process per case and method "
                   "(about 3 s each)")


def _run_cpu_core(a, log):
    if a.quick:
        log(_quick_line(a))
    shapes = a.shapes or (cpu_core.NAMES[-1:] if a.quick else None)  # quick: smallest only
    cpu_core.run(log, shapes=shapes, with_compile=a.with_compile, with_memory=a.memory)


# -- train (options owned by lie_kernels/bench/train.py's author) --------------------------

def _train_args(p):
    from . import train
    _common(p, "train.txt (the table), train.csv, train-processes.csv (one line a process) "
            "and train.png (the plot)",
            f"{', '.join(train.QUICK_MODELS)} with {', '.join(train.QUICK_METHODS)}, "
            "a small batch, 1 timed step, 1 process per row")
    p.add_argument("--models", type=_choices_list(train.MODELS, "model"), metavar="LIST",
                   help=f"comma list of {', '.join(train.MODELS)} (default: all)")
    p.add_argument("--methods", type=_choices_list(list(train.METHOD_KEYS), "method"),
                   metavar="LIST", help="comma list of " + ", ".join(
                       f"{k} ({v})" for k, v in train.METHOD_KEYS.items()) + " (default: all)")
    p.add_argument("--rank", type=int, default=train.RANK,
                   help=f"rank of every method (default: {train.RANK})")
    p.add_argument("--repeats", type=_positive_int, metavar="N",
                   help="fresh processes per row, medians over them (default: 3; --quick: 1)")
    full, quick = train.SETTINGS["full"], train.SETTINGS["quick"]
    p.add_argument("--batch", type=_positive_int, metavar="N",
                   help=f"batch of every model (default: {full['batch']}; --quick: "
                        f"{quick['batch']})")
    p.add_argument("--seq", type=_positive_int, metavar="N",
                   help=f"tokens per Llama sequence (default: {full['seq']}; --quick: "
                        f"{quick['seq']})")


def _run_train(a, log):
    from . import train
    methods = a.methods and [train.METHOD_KEYS[k] for k in a.methods]
    train.run(a.device, log, models=a.models, methods=methods, rank=a.rank, quick=a.quick,
              out=a.out, repeats=a.repeats, batch=a.batch, seq=a.seq)


# -- multi -------------------------------------------------------------------------------

def _multi_args(p):
    _common(p, "multi.txt (the table)", "order 1, 3 repeats on CPU")
    p.add_argument("--orders", type=_orders, metavar="LIST",
                   help="series orders, integers >= 0 or 'exact' (default: 1,4,exact; "
                   "--quick: 1)")


def _run_multi(a, log):
    from . import multi_layer
    multi_layer.run(a.device, log, orders=a.orders or ([1] if a.quick else [1, 4, None]))


# -- roofline ----------------------------------------------------------------------------

def _roofline_args(p):
    _common(p, "roofline.txt (the table) and roofline.csv",
            "no effect (nothing is measured; the full table takes about a second)",
            device=False)
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], metavar="LIST",
                   help="low-rank ranks to predict (default: each sweep case's own rank)")


def _run_roofline(a, log):
    from . import roofline
    roofline.run(a.out, log, ranks=a.ranks)


# -- linear ------------------------------------------------------------------------------

def _linear_args(p):
    from . import linear_bwd
    _common(p, "linear.txt (the table)", "the first shape only, 256 tokens")
    p.add_argument("--dtype", choices=list(linear_bwd.DTYPES), default="bf16",
                   help="W, x and gradient dtype (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=8192,
                   help="rows of x (batch x sequence; default: %(default)s; --quick: 256)")


def _run_linear(a, log):
    from . import linear_bwd
    linear_bwd.run(a.device, log, dtype=a.dtype, tokens=a.tokens, quick=a.quick)


#: name: (one-line help, add its flags, run it)
COMMANDS = {
    "sweep": ("every usable lie_kernels backend against the eager reference, "
              "torch.compile(reference) and PEFT HiRA's formula on real model shapes; "
              "table, CSV and plot (the default)", _sweep_args, _run_sweep),
    "cpu-core": ("the CPU path against the eager reference and its compiled form on four conv "
                 "shapes: time, and peak memory of a fresh process", _cpu_core_args,
                 _run_cpu_core),
    "train": ("one AdamW step of torchvision ResNet-18, timm ConvNeXt and a transformers "
              "Llama (random weights), each in a fresh process: LieRA orders vs PEFT LoRA, "
              "PEFT HiRA (+ patch_hira) and full fine-tuning; table, CSV and plot",
              _train_args, _run_train),
    "multi": ("all 53 ResNet-50 convs: one grouped build of every W' against the per-layer "
              "loop", _multi_args, _run_multi),
    "roofline": ("predicted H200 time of the Triton kernels on the sweep shapes from the bytes "
                 "and work they really do (no GPU needed); table and roofline.csv",
                 _roofline_args, _run_roofline),
    "linear": ("a 16-bit LieLinear layer's forward + backward on Triton: the fused Linear "
               "backward (dL/dW' never written) against forming dL/dW' first; time and peak "
               "memory (GPU only)", _linear_args, _run_linear),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lie_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_args(p)
        p.set_defaults(run=run)
    return ap


def parse(argv=None) -> argparse.Namespace:
    """Parse the command line; no subcommand means ``sweep`` (with the sweep's flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "sweep")
    ap = parser()
    a, extra = ap.parse_known_args(argv)
    sub = next(x for x in ap._actions if isinstance(x, argparse._SubParsersAction))
    own = sub.choices[a.command]
    if extra:
        flags = [f for x in own._actions for f in x.option_strings
                 if f.startswith("--") and f != "--help"]
        own.error(f"unrecognized arguments: {' '.join(extra)}; {a.command} takes "
                  f"{', '.join(flags)}")
    if getattr(a, "device", None) == "cuda" and not torch.cuda.is_available():
        own.error("--device cuda: no CUDA device is visible to torch here; valid: cpu")
    if getattr(a, "with_compile", False) is None:
        a.with_compile = not a.quick
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.quick:
        measure.EFFORT.update(warmup=1, max_reps=3, budget_s=0.2)
    os.makedirs(a.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(measure.device_line(getattr(a, "device", "cpu")))
    a.run(a, log)
    with open(os.path.join(a.out, f"{a.command}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
