"""64-bit offsets in the Triton kernels: views of W whose element offsets
pass 2**31 must be read exactly, never wrapped.

The storages below are large but virtual (torch.empty does not touch them); only
the few elements of the view are written and read, so these run in the Triton
interpreter on CPU in seconds. The torch backend is the reference.
"""
import pytest
import torch

import lie_kernels as lk
from lie_kernels.backends import get_backend

USABLE, WHY = lk.available_backends().get("triton", (False, "triton backend not registered"))
needs_triton = pytest.mark.skipif(not USABLE, reason=f"triton unusable here: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _strided(numel, shape, stride, dtype=torch.float16):
    """A view into a huge (virtual) storage with random values in the view."""
    w = torch.empty(numel, dtype=dtype, device=DEVICE).as_strided(shape, stride)
    w.copy_(torch.randn(shape, dtype=torch.float32))
    return w


def _check(w, rank=4, zero_b=False):
    """Triton vs torch backend, forward and backward, on the view ``w``."""
    tr, ref = get_backend("triton"), get_backend("torch")
    u = torch.randn(w.shape[0], rank, device=DEVICE, dtype=w.dtype) * (0 if zero_b else 0.3)
    p = torch.randn(rank, w[0].numel(), device=DEVICE, dtype=w.dtype) * 0.3
    out = tr.forward(w, u, p, 2, 0.5)
    assert torch.equal(out, ref.forward(w, u, p, 2, 0.5)) if zero_b else \
        (out.float() - ref.forward(w, u, p, 2, 0.5).float()).abs().max() < 1e-2
    g = torch.randn(w.shape, device=DEVICE, dtype=w.dtype)
    _, du, dp = tr.backward(g, w, u, p, 2, 0.5, False)
    _, rdu, rdp = ref.backward(g, w, u, p, 2, 0.5, False)
    assert (du.float() - rdu.float()).abs().max() < 2e-2 * rdu.float().abs().max() + 1e-3
    assert (dp.float() - rdp.float()).abs().max() < 2e-2 * rdp.float().abs().max() + 1e-3
    return out


@needs_triton
def test_row_offsets_past_2_31_with_zero_update():
    """Rows 2**30+8 apart (row 2 at 2**31+16): was a segfault."""
    w = _strided(2 ** 31 + 64, (3, 16), (2 ** 30 + 8, 1))
    out = _check(w, zero_b=True)
    assert torch.equal(out, w)


@needs_triton
def test_row_stride_just_below_2_31():
    """Row stride 2**31-16: row 2 was read 32 elements before W."""
    w = _strided(2 * (2 ** 31 - 16) + 16, (3, 16), (2 ** 31 - 16, 1))
    _check(w)


@needs_triton
def test_column_offsets_past_2_31():
    """A huge column stride: column 15 sits at 15·2**28 > 2**31 elements."""
    w = _strided(15 * 2 ** 28 + 4 * 1 + 1, (4, 16), (1, 2 ** 28))
    _check(w)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: the interpreter would "
                    "take ~9 min and 8 GiB for 2**31 elements (the strided views above "
                    "cover the offsets on CPU)")
def test_forward_weight_over_2_31_elements():
    """A real fp16 weight of more than 2**31 elements vs a chunked torch reference."""
    free, _ = torch.cuda.mem_get_info()
    rows, cols = 2 ** 16 + 3, 2 ** 15 + 8  # 2**31 + 8·2**16 + 3·2**15 + 24 elements
    if free < 3 * rows * cols * 2:
        pytest.skip(f"needs {3 * rows * cols * 2 / 2**30:.1f} GiB free on the GPU, "
                    f"{free / 2**30:.1f} GiB free")
    w = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    u = torch.randn(rows, 8, device="cuda", dtype=torch.float16) * 0.1
    p = torch.randn(8, cols, device="cuda", dtype=torch.float16) * 0.1
    out = get_backend("triton").forward(w, u, p, 2, 1.0)
    ref = get_backend("torch")
    for lo in range(0, rows, 8192):  # chunked reference: each chunk < 2**31 elements
        hi = min(rows, lo + 8192)
        exp = ref.forward(w[lo:hi], u[lo:hi], p, 2, 1.0)
        assert (out[lo:hi].float() - exp.float()).abs().max() <= 2e-2 * exp.float().abs().max()
