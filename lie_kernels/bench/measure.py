"""Timing, peak memory and copy bandwidth, on CUDA or CPU.

Timing: every benchmark reports the minimum and the median over its repeats
(CUDA events via ``triton.testing.do_bench`` on a GPU, ``perf_counter`` after
warm-up calls on a CPU). The spread ``median / min`` says how noisy the machine
was: above :data:`BUSY_SPREAD` other processes were competing for the device,
and :func:`busy_warning` says so.

Peak memory: the most tensor memory live at once during one call, above what
was live before it, as PyTorch's allocator counts it:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the running sum of the CPU
allocator's allocation and free events recorded by ``torch.profiler``
(``profile_memory=True``). The CPU figure is exact and repeatable, and comparable
with the CUDA one; it leaves out scratch memory that libraries such as oneDNN or
MKL allocate outside PyTorch. (The process's resident high-water mark is no
substitute inside a long run: freed heap blocks stay resident and are reused,
so a later call can allocate hundreds of MiB without the mark moving.)
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from typing import Callable, Dict, NamedTuple, Optional

import torch

from .. import __version__

#: CPU timing effort: (warm-up calls, repeats, seconds budget); ``--quick`` lowers it
EFFORT = {"warmup": 2, "max_reps": None, "budget_s": 2.0}
#: median / min above this means the timings were disturbed (a busy machine)
BUSY_SPREAD = 1.3


class Timing(NamedTuple):
    """Minimum and median wall time of ``reps`` calls, in ms."""
    min: float
    median: float
    reps: int

    @property
    def spread(self) -> float:
        return self.median / self.min


def _status_mib(field: str) -> Optional[float]:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
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


def time_ms(fn: Callable[[], object], device: str, reps: int = 7) -> Timing:
    """Min and median wall time of ``fn`` in ms, after warm-up calls."""
    if device == "cuda":
        from triton.testing import do_bench
        times = do_bench(fn, warmup=25, rep=100, return_mode="all")
    else:
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
    return Timing(min(times), statistics.median(times), len(times))


def median_ms(fn: Callable[[], object], device: str, reps: int = 7) -> float:
    """Median wall time in ms (see :func:`time_ms`)."""
    return time_ms(fn, device, reps).median


def busy_warning(timings: Dict[str, Timing], device: str) -> Optional[str]:
    """A warning line when any ``median / min`` exceeds :data:`BUSY_SPREAD`, else None."""
    noisy = {k: t for k, t in timings.items() if t.spread > BUSY_SPREAD}
    if not noisy:
        return None
    worst = max(noisy, key=lambda k: noisy[k].spread)
    load = ""
    if device == "cpu" and hasattr(os, "getloadavg"):
        load = (f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads")
    return (f"# WARNING: noisy timings: {len(noisy)} of {len(timings)} have median/min > "
            f"{BUSY_SPREAD} (worst {noisy[worst].spread:.2f}, {worst}){load}. Other processes "
            f"are competing for the {device} (or --quick took too few repeats): the speedups "
            f"are unreliable; rerun on an idle machine.")


def _cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak of the running sum of CPU allocator events during ``fn`` (None if unrecorded)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "9")  # kineto's start/stop chatter on stderr
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without this (semi-private) view of the trace
        return None
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak tensor memory of one call above what was live before it, in MiB
    (None if this torch cannot record it)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    peak = _cpu_peak_bytes(fn)
    return None if peak is None else peak / 2 ** 20


def copy_bandwidth_gbs(device: str) -> float:
    """Device copy bandwidth (read + write), measured now: the ceiling for a one-pass kernel."""
    n = (256 if device == "cuda" else 32) * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# -- the machine a result was measured on ----------------------------------------------
def _cpu_name() -> str:
    """The CPU model (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line(device: str) -> str:
    """A result file's first line: the time (UTC), the device, and the versions that
    decide its numbers."""
    name = (torch.cuda.get_device_name() if device == "cuda" else
            f"{_cpu_name()}, {torch.get_num_threads()} threads")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device} "
            f"({name}), torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}, "
            f"lie_kernels {__version__}")
