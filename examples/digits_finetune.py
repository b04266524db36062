"""Fine-tune a small conv net to new classes with LieRA, a LoRA-style conv adapter, or fully.

Pretrain on scikit-learn's handwritten digits 0-4 (8x8 images, shipped with the
package: nothing is downloaded), then adapt the frozen body to digits 5-9 with a
new head. Prints a table (accuracy, trainable params, time, peak RSS) and saves
``results.csv`` and ``results.png`` under ``--out``.

    python examples/digits_finetune.py            # ~15 s on 2 CPU cores
    python examples/digits_finetune.py --quick    # a few seconds, for the test
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

import lie_kernels as lk


class LoRAConv2d(nn.Module):
    """LoRA for a conv: ``y = conv(x) + s · B(A(x))``, A a conv with the base kernel to r
    channels, B a 1x1 conv back to C_out (zero init, so training starts at the base)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float = 1.0):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        self.a = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                           base.dilation, bias=False)
        self.b = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.b(self.a(x))


def body() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def load_tasks(seed: int):
    """``{"pre": ..., "new": ...}``, each ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    tasks = {}
    for name, keep in (("pre", y < 5), ("new", y >= 5)):
        xs, ys = x[keep], y[keep] % 5
        parts = train_test_split(xs, ys, test_size=0.3, random_state=seed, stratify=ys)
        tasks[name] = (parts[0], parts[2], parts[1], parts[3])
    return tasks


def train(model, params, data, epochs: int, lr: float, seed: int) -> None:
    x, y = data[0], data[1]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    return (model(data[2]).argmax(-1) == data[3]).float().mean().item()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 2 ms).

    Most of a small run's RSS is torch itself, so ``peak - start`` is reported too."""

    def __enter__(self):
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def adapt_lie(model, order):
    return lk.inject(model, nn.Conv2d, rank=4, parametrization="tucker", order=order)


def adapt_lora(model):
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            model[i] = LoRAConv2d(m, rank=4)
    return model


#: method -> (make the body trainable the method's way, learning rate)
METHODS = {
    "head only": (lambda m: m.requires_grad_(False), 1e-2),
    "LieRA order 1": (lambda m: adapt_lie(m.requires_grad_(False), 1), 1e-2),
    "LieRA order 4": (lambda m: adapt_lie(m.requires_grad_(False), 4), 1e-2),
    "LieRA exact": (lambda m: adapt_lie(m.requires_grad_(False), None), 1e-2),
    "LoRA conv": (lambda m: adapt_lora(m.requires_grad_(False)), 1e-2),
    "full fine-tune": (lambda m: m, 1e-3),
}


def run(epochs_pre: int, epochs_new: int, seed: int):
    torch.manual_seed(seed)
    tasks = load_tasks(seed)
    pre = nn.Sequential(body(), nn.Linear(64, 5))
    train(pre, pre.parameters(), tasks["pre"], epochs_pre, 1e-2, seed)
    rows = [{"method": "pretrained (digits 0-4)", "accuracy": accuracy(pre, tasks["pre"]),
             "trainable": sum(p.numel() for p in pre.parameters()), "time_s": float("nan"),
             "peak_rss_mib": float("nan"), "rss_growth_mib": float("nan")}]
    for name, (adapt, lr) in METHODS.items():
        torch.manual_seed(seed)
        model = nn.Sequential(adapt(copy.deepcopy(pre[0])), nn.Linear(64, 5))  # new head
        params = [p for p in model.parameters() if p.requires_grad]
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            train(model, params, tasks["new"], epochs_new, lr, seed)
            elapsed = time.perf_counter() - t0
        rows.append({"method": name, "accuracy": accuracy(model, tasks["new"]),
                     "trainable": sum(p.numel() for p in params), "time_s": elapsed,
                     "peak_rss_mib": mem.peak, "rss_growth_mib": mem.peak - mem.start})
    return rows


def table(rows) -> str:
    lines = ["| method | test acc | trainable params | train time (s) | peak RSS (MiB) "
             "| RSS growth (MiB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['accuracy']:.3f} | {r['trainable']:,} | "
              f"{r['time_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['rss_growth_mib']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def save(rows, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    adapted = rows[1:]
    names = [r["method"] for r in adapted]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("accuracy", "trainable", "time_s"),
                              ("test accuracy on digits 5-9", "trainable parameters",
                               "training time (s)")):
        ax.barh(names, [r[key] for r in adapted])
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_xscale("log")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few epochs (for tests)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(*((8, 6) if args.quick else (30, 30)), args.seed)
    print(table(rows))
    save(rows, args.out)
    print(f"saved {args.out / 'results.csv'} and {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
