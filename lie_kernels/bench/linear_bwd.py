"""A 16-bit LieLinear layer's forward + backward: the fused Linear backward against
forming dL/dW' first.

With a 16-bit W on Triton, ``LieLinear``'s backward computes ``dL/dW' = g_yᵀ x`` tile
by tile with the Lie backward as the GEMM's epilogue (``lie_linear_bwd_kernel``):
dL/dW' is never written. "unfused" runs the same layer with the backend's default
``linear_backward`` (one GEMM writes dL/dW', then the Lie backward reads it). Both
take the default (atomic) reduction. GPU only: on CPU the Triton kernels run in the
interpreter, which is not a speed path.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, List, Optional

import torch
from torch import nn

import lie_kernels as lk

from ..backends import Backend, get_backend
from . import measure, roofline

#: (C_out, C_in) of Llama-7B's attention and MLP projections
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

LEGEND = [
    ("fused / unfused", "one forward + backward of the layer (into its two factors; x and W "
     "frozen): with the fused Linear backward, and with dL/dW' formed by a separate GEMM "
     "first. *_ms = median wall time (CUDA events); *_MiB = peak memory above what was live "
     "before the step (max_memory_allocated)."),
    ("speedup", "unfused_ms / fused_ms: > 1 means the fused backward is faster."),
    ("saving_us, pred_us", "unfused_ms - fused_ms in µs, measured, and as the H200 roofline "
     "predicts it (roofline.predict_linear_grad: the GEMM no longer writes dL/dW' and the Lie "
     "backward no longer reads it back, one launch less); measured / predicted is what a GPU "
     "run checks."),
]


@contextlib.contextmanager
def unfused(backend):
    """``backend`` with the base class's ``linear_backward`` (form dL/dW', then backward)."""
    backend.linear_backward = types.MethodType(Backend.linear_backward, backend)
    try:
        yield
    finally:
        del backend.linear_backward


def measure_shape(c_out: int, c_in: int, tokens: int, dtype: torch.dtype, rank: int,
                  device: str, be: Backend) -> Dict[str, Optional[float]]:
    """Time and peak memory of one layer's step, fused and unfused (``be`` is Triton)."""
    torch.manual_seed(0)
    base = nn.Linear(c_in, c_out, bias=False).to(device, dtype)
    layer = lk.nn.LieLinear(base, rank=rank, order=1, backend="triton")
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    x = torch.randn(tokens, c_in, device=device, dtype=dtype)
    g = torch.randn(tokens, c_out, device=device, dtype=dtype)

    def step():
        torch.autograd.grad(layer(x), params, g)
    row: Dict[str, Optional[float]] = dict(shape=f"{c_out}x{c_in}")
    for name, ctx in (("fused", contextlib.nullcontext()), ("unfused", unfused(be))):
        with ctx:
            row[f"{name}_ms"] = measure.median_ms(step, device)
            row[f"{name}_MiB"] = measure.peak_mib(step, device)
    row["speedup"] = row["unfused_ms"] / row["fused_ms"]
    return row


def run(device: str, log=print, dtype: str = "bf16", tokens: int = 8192, rank: int = 16,
        quick: bool = False) -> List[Dict]:
    if device != "cuda":
        log("# linear: needs a CUDA device (the fused Linear backward is a Triton kernel; on "
            "CPU it runs only in the interpreter, which is not a speed path): nothing measured")
        return []
    be = get_backend("triton")
    shapes = SHAPES[:1] if quick else SHAPES
    tokens = 256 if quick else tokens
    log(f"# LieLinear fwd+bwd, {dtype}, rank {rank}, order 1, {tokens} tokens, backend triton: "
        "fused Linear backward vs dL/dW' formed first")
    log(f"{'shape':>12}{'fused_ms':>10}{'unfused_ms':>12}{'speedup':>9}{'saving_us':>11}"
        f"{'pred_us':>9}{'fused_MiB':>11}{'unfused_MiB':>13}")
    rows = []
    for c_out, c_in in shapes:
        row = measure_shape(c_out, c_in, tokens, DTYPES[dtype], rank, device, be)
        pred = [roofline.predict_linear_grad(c_out, c_in, tokens, rank, dtype, fused)["time_us"]
                for fused in (False, True)]
        row["saving_us"] = (row["unfused_ms"] - row["fused_ms"]) * 1e3
        row["pred_us"] = pred[0] - pred[1]
        rows.append(row)
        log(f"{row['shape']:>12}{row['fused_ms']:>10.3f}{row['unfused_ms']:>12.3f}"
            f"{row['speedup']:>9.2f}{row['saving_us']:>11.1f}{row['pred_us']:>9.1f}"
            f"{row['fused_MiB']:>11.1f}{row['unfused_MiB']:>13.1f}")
    for key, text in LEGEND:
        log(f"# {key}: {text}")
    return rows
