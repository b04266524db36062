"""fp32 scratch reused from call to call, one buffer per (device, stream) and pool.

The Triton backward adds into fp32 scratch that must start at zero, and its
finish kernel zeroes what it read. Keeping that scratch between calls saves the
memset launch a fresh ``torch.zeros`` costs on every backward, a third of the
launches of a small layer's backward (those are launch-bound). Scratch that a
kernel overwrites whole (the deterministic backward's dp partials) comes from a
second pool with no all-zero rule: a fresh ``torch.empty`` would cost a fill
launch there, because ``torch.use_deterministic_algorithms(True)`` also fills
uninitialised memory with NaN (``torch.utils.deterministic``).

Safety: a buffer is taken out of the pool for the duration of a call, so a
concurrent call on the same stream gets a fresh one instead of sharing it;
kernels on one stream run in order, so the next call there sees the zeros the
finish kernel wrote. A call that raises returns its buffer marked dirty, and the
next user zeroes it first. Scratch above ``MAX_FLOATS`` is allocated per call,
and so is scratch taken while a CUDA graph is being captured: graphs captured on
one capture stream would otherwise share an address, and replaying two of them
on different streams would race on it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

import torch
from torch import Tensor

#: larger scratch is allocated zeroed per call: next to such a kernel the memset is
#: noise, and a persistent buffer that size would hold memory for nothing (8 MiB)
MAX_FLOATS = 1 << 21


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _key(device: torch.device) -> Tuple:
    if device.type == "cuda":
        return device.type, device.index, torch.cuda.current_stream(device).cuda_stream
    return device.type, device.index


class Workspace:
    """A pool of fp32 buffers keyed by (device, stream): all zero when ``zeroed``,
    else with whatever the last user left in them."""

    def __init__(self, zeroed: bool = True):
        self.zeroed = zeroed
        self._lock = threading.Lock()
        self._free: Dict[Tuple, Tuple[Tensor, bool]] = {}  # key -> (buffer, all zero)

    def _new(self, n: int, device: torch.device) -> Tensor:
        make = torch.zeros if self.zeroed else torch.empty
        return make(n, dtype=torch.float32, device=device)

    @contextmanager
    def take(self, n: int, device: torch.device) -> Iterator[Tensor]:
        """An fp32 tensor of ``n`` elements, this call's alone. From a ``zeroed`` pool
        it is all zero and the caller must leave it all zero again (in stream order)
        when the block exits normally; otherwise the caller writes before it reads."""
        if n > MAX_FLOATS or _capturing(device):
            yield self._new(n, device)
            return
        key = _key(device)
        with self._lock:
            buf, clean = self._free.pop(key, (None, True))
        if buf is None or buf.numel() < n:
            buf, clean = self._new(min(MAX_FLOATS, 1 << max(0, n - 1).bit_length()), device), True
        if self.zeroed and not clean:
            buf.zero_()
        ok = False
        try:
            yield buf[:n]
            ok = True
        finally:
            with self._lock:
                self._free[key] = (buf, ok)
