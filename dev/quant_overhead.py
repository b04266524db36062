"""What a quantized base costs a training step, measured in one process.

``python -m dev.quant_overhead [--bases nf4,int8] [--orders 1,4,exact] [--rounds 12]
[--batch 4] [--seq 128]`` builds the ``bench train`` Llama unquantized and on each base,
all with LieRA of the given order at ``train.RANK``, and alternates their steps: round
after round, one step of each model, every other round in reverse order (so none always
steps first). It prints, per order, the median over rounds of quantized / unquantized.
That is the "within 1.10x of the same method unquantized" target of docs/quantized.md.

``bench train`` measures the same thing in fresh processes, a quantized row next to its
unquantized twin in each round. On this shared machine one round's ratio there ranged
from 0.92 to 1.13 (7 rounds, 2026-12-04). Steps taken a second apart in one process see
the same machine.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

from lie_kernels.bench import measure, train

#: the quantized model of ``bench train`` for each base
MODEL_OF = {kind: name for name, kind in train.QUANTIZED.items()}


def ratios(bases: List[str], order: str, rounds: int, batch: int, seq: int) -> Dict[str, float]:
    """``{base: median over rounds of step(base) / step(unquantized)}`` for one order;
    two untimed rounds first (they allocate the AdamW state)."""
    names = ["llama-all"] + [MODEL_OF[b] for b in bases]
    steps = {}
    for name in names:
        model, ids, loss_fn, targets = train.build(name, batch, 32, seq, "cpu")
        model = train.adapt(model, f"LieRA order={order}", targets, train.RANK)
        steps[name] = train.stepper(model, ids, loss_fn)
    per_round: Dict[str, List[float]] = {b: [] for b in bases}
    for i in range(rounds + 2):
        ms = {}
        for name in names[::-1] if i % 2 else names:
            t0 = time.perf_counter()
            steps[name]()
            ms[name] = time.perf_counter() - t0
        if i >= 2:
            for b in bases:
                per_round[b].append(ms[MODEL_OF[b]] / ms["llama-all"])
    return {b: statistics.median(r) for b, r in per_round.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dev.quant_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", default="nf4,int8", help="comma-separated, from nf4,int8")
    p.add_argument("--orders", default="1,4,exact", help="comma-separated LieRA orders")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args(argv)
    bases = a.bases.split(",")
    bad = [b for b in bases if b not in MODEL_OF]
    if bad:
        p.error(f"--bases: expected names from {sorted(MODEL_OF)}, got {bad}")
    orders = a.orders.split(",")
    bad = [o for o in orders if not (o == "exact" or o.isdigit())]
    if bad:
        p.error(f"--orders: expected non-negative integers or 'exact', got {bad}")
    import bitsandbytes
    print(f"{measure.device_line('cpu')}, bitsandbytes {bitsandbytes.__version__}")
    print(f"# quantized / unquantized step, LieRA rank {train.RANK}, Llama batch {a.batch} x "
          f"{a.seq}; median over {a.rounds} rounds of steps alternated in one process")
    for order in orders:
        r = ratios(bases, order, a.rounds, a.batch, a.seq)
        print(f"order {order}: " + "; ".join(f"{b} {v:.3f}" for b, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
