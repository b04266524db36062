"""Timing, peak memory and copy bandwidth, on CUDA or CPU.

CPU peak memory is the process's resident high-water mark (``VmHWM``) above the
resident size at the start of the measurement, after resetting the mark
(``/proc/self/clear_refs``). The first memory measurement tells
``glibc`` to ``mmap`` every block above 64 KiB, so freed memory leaves the
process and the mark follows live memory. That slows later allocations, so
callers time everything first and measure memory last.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable, Optional

import torch

_M_MMAP_THRESHOLD = -3
#: CPU timing effort: (warm-up calls, repeats, seconds budget); ``--quick`` lowers it
EFFORT = {"warmup": 2, "max_reps": None, "budget_s": 2.0}


def _mmap_threshold(nbytes: int) -> None:
    """glibc's size above which blocks are mmap-backed (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def _status_mib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, reps: int = 7) -> float:
    """Median wall time in ms (CUDA events via ``triton.testing.do_bench`` on a GPU)."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    warmup, budget_s = EFFORT["warmup"], EFFORT["budget_s"]
    reps = min(reps, EFFORT["max_reps"] or reps)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak memory of one call above what was live before it (None if unmeasurable)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    _mmap_threshold(64 * 1024)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_mib("VmRSS")
    fn()
    peak = _status_mib("VmHWM")
    return None if base is None or peak is None else max(0.0, peak - base)


def copy_bandwidth_gbs(device: str) -> float:
    """Device copy bandwidth (read + write), measured now: the ceiling for a one-pass kernel."""
    n = (256 if device == "cuda" else 32) * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
