"""The Triton backend on a quantized base weight (``lie_kernels.quant.QuantizedWeight``):
the dequantization fused into the forward, backward and fused Linear backward kernels.

Here (no GPU) the kernels run in the Triton interpreter on CPU tensors, with small grids
and big tiles; on a GPU the same tests run the compiled kernels. The reference is
``deq(W) ⊙ exp_K(s·Δ)`` in float64, ``deq(W)`` from ``QuantizedWeight.rows`` (fp32, the
values bitsandbytes dequantizes to) widened to float64. What the compiled kernels look
like (128-bit loads of the packed bytes, no spills) is tests/test_kernel_health.py.
"""
import pytest
import torch

import lie_kernels as lk
from lie_kernels import quant
from lie_kernels.backends import get_backend, triton_backend
from lie_kernels.reference import lie_weight_lowrank_ref

from helpers import rel_err

bnb = pytest.importorskip("bitsandbytes")
USABLE, WHY = lk.available_backends().get("triton", (False, "triton backend not registered"))
pytestmark = pytest.mark.skipif(not USABLE, reason=f"triton unusable here: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ORDERS = [0, 1, 2, 8, None]
#: (kind, 4-bit blocksize, nested absmax); nf4 with nested statistics as QLoRA stores them
FORMATS = [("nf4", 64, False), ("fp4", 32, False), ("nf4", 128, True), ("int8", 0, False),
           ("fp8", 0, False)]
FORMAT_IDS = ["nf4", "fp4-bs32", "nf4-nested", "int8", "fp8"]
#: (R, M, rank): odd R over two row blocks of the interpreter's tiles, M even but no
#: multiple of the tile nor of the absmax blocksize (rows start mid-block), rank pads 16
#: and 32
SHAPES = [(37, 330, 5), (70, 202, 20)]


def quantized(kind, rows, cols, dtype, blocksize=64, nested=False):
    """A ``rows × cols`` QuantizedWeight of ``kind`` with compute dtype ``dtype``: 4-bit and
    int8 quantized by bitsandbytes, fp8 with per-row absmax scales."""
    w = 0.1 * torch.randn(rows, cols)
    if kind == "int8":
        return quant.from_bnb(bnb.nn.Int8Params(w, requires_grad=False,
                                                has_fp16_weights=False).to(DEVICE), dtype)
    if kind == "fp8":
        scale = w.abs().amax(1) / 448
        q = (w / scale[:, None]).to(torch.float8_e4m3fn)
        return quant.QuantizedWeight("fp8", q.to(DEVICE), scale.to(DEVICE), q.shape, dtype)
    return quant.from_bnb(bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind,
                                            blocksize=blocksize,
                                            compress_statistics=nested).to(DEVICE), dtype)


def factors(rows, cols, rank, dtype):
    return ((0.4 * torch.randn(rows, rank)).to(DEVICE, dtype),
            (0.4 * torch.randn(rank, cols)).to(DEVICE, dtype))


def reference(qw, u, p, order, scale, grad):
    """``(W', du, dp)`` in float64 from ``deq(W)`` and ``g = grad``."""
    u64, p64 = (t.detach().cpu().double().requires_grad_() for t in (u, p))
    out = lie_weight_lowrank_ref(qw.rows(0, qw.shape[0]).cpu().double(), p64, u64, order,
                                 scale)
    out.backward(grad.cpu().double())
    return out, u64.grad, p64.grad


def skip_bf16_in_the_interpreter(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter rounds fp32->bf16 by truncation (measured: "
                    "0.78038 -> 0.777 instead of 0.781), so bf16 Triton accuracy is "
                    "judged on a GPU only")


@pytest.mark.parametrize("shape", SHAPES, ids=["rank-pad-16", "rank-pad-32"])
@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_fp32_compute_matches_float64(fmt, order, shape):
    """W', du and dp over every format and order at fp32 compute, against float64."""
    kind, blocksize, nested = fmt
    rows, cols, rank = shape
    qw = quantized(kind, rows, cols, torch.float32, blocksize, nested)
    u, p = factors(rows, cols, rank, torch.float32)
    be = get_backend("triton")
    assert be.not_supported_reasons(qw, u, p, order) == []
    g = torch.randn(rows, cols).to(DEVICE)
    out = be.forward(qw, u, p, order, 0.5)
    dw, du, dp = be.backward(g, qw, u, p, order, 0.5, False)
    ref, rdu, rdp = reference(qw, u, p, order, 0.5, g)
    assert out.shape == qw.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert dw is None and du.dtype == dp.dtype == torch.float32
    assert rel_err(out, ref) < 2e-6
    if order == 0:  # no contraction: W' is deq(W), bitwise
        assert torch.equal(out, qw.rows(0, rows)) and not du.any() and not dp.any()
        return
    assert rel_err(du, rdu) < 2e-5 and rel_err(dp, rdp) < 2e-5


@pytest.mark.parametrize("block_c", [16, 64], ids=["8-byte-chunks", "two-chunks"])
@pytest.mark.parametrize("kind,blocksize", [("nf4", 64), ("fp4", 32)])
def test_small_tiles(kind, blocksize, block_c, monkeypatch):
    """Many tiles of a few packed-byte chunks each (a GPU's tile shapes, not the
    interpreter's one big tile): chunks that straddle an absmax block, rows that start
    mid-block and mid-chunk (M/2 = 165 bytes), partial last tiles."""
    if DEVICE == "cuda":
        pytest.skip("the interpreter's tiles; a GPU runs its own table's")
    monkeypatch.setattr(triton_backend, "_interp_config",
                        lambda rows, cols: triton_backend.Config(16, block_c, 4, 1))
    rows, cols, rank = SHAPES[0]
    qw = quantized(kind, rows, cols, torch.float32, blocksize)
    u, p = factors(rows, cols, rank, torch.float32)
    g = torch.randn(rows, cols)
    be = get_backend("triton")
    out = be.forward(qw, u, p, 2, 0.5)
    _, du, dp = be.backward(g, qw, u, p, 2, 0.5, False)
    ref, rdu, rdp = reference(qw, u, p, 2, 0.5, g)
    assert rel_err(out, ref) < 2e-6 and rel_err(du, rdu) < 2e-5 and rel_err(dp, rdp) < 2e-5
    assert torch.equal(be.forward(qw, u, p, 0, 0.5), qw.rows(0, rows))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_triton_equals_the_torch_backend(kind, deterministic):
    """Same inputs, the torch backend (which dequantizes a block of rows at a time): the
    same W' and gradients within fp32 rounding, with either backward reduction."""
    rows, cols, rank = SHAPES[0]
    qw = quantized(kind, rows, cols, torch.float32)
    u, p = factors(rows, cols, rank, torch.float32)
    g = torch.randn(rows, cols).to(DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        tri, ref = get_backend("triton"), get_backend("torch")
        assert rel_err(tri.forward(qw, u, p, 2, 0.5), ref.forward(qw, u, p, 2, 0.5)) < 1e-6
        got, want = (be.backward(g, qw, u, p, 2, 0.5, False) for be in (tri, ref))
    finally:
        torch.use_deterministic_algorithms(before)
    assert got[0] is None and want[0] is None
    assert rel_err(got[1], want[1]) < 1e-5 and rel_err(got[2], want[2]) < 1e-5


@pytest.mark.parametrize("fp32_factors", [False, True], ids=["own-factors", "fp32-factors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", [1, 8, None], ids=str)
@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_16bit_compute(kind, order, dtype, fp32_factors):
    """A 16-bit compute dtype: W' in it, the rank contractions on 16-bit operands (tensor
    cores on a GPU), factors in it or in fp32 (PEFT's autocast). Within the dtype's
    rounding of float64, and of the torch backend."""
    skip_bf16_in_the_interpreter(dtype)
    rows, cols, rank = SHAPES[1]
    qw = quantized(kind, rows, cols, dtype)
    u, p = factors(rows, cols, rank, torch.float32 if fp32_factors else dtype)
    g = torch.randn(rows, cols).to(DEVICE, dtype)
    tri, tor = get_backend("triton"), get_backend("torch")
    out = tri.forward(qw, u, p, order, 0.5)
    _, du, dp = tri.backward(g, qw, u, p, order, 0.5, False)
    ref, rdu, rdp = reference(qw, u, p, order, 0.5, g)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert out.dtype == dtype and (du.dtype, dp.dtype) == (u.dtype, p.dtype)
    assert rel_err(out, ref) < tol and rel_err(du, rdu) < tol and rel_err(dp, rdp) < tol
    _, tdu, tdp = tor.backward(g, qw, u, p, order, 0.5, False)
    assert rel_err(out, tor.forward(qw, u, p, order, 0.5)) < tol
    assert rel_err(du, tdu) < tol and rel_err(dp, tdp) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=["rank-pad-16", "rank-pad-32"])
@pytest.mark.parametrize("order", [1, 2, None], ids=str)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fused_linear_backward(kind, order, shape, dtype, monkeypatch):
    """``linear_backward`` runs the fused kernel (dL/dW' = grad_yᵀ x never formed; the
    unfused route would call ``backward``) and reads deq(W) from the packed weight."""
    skip_bf16_in_the_interpreter(dtype)
    rows, cols, rank = shape
    qw = quantized(kind, rows, cols, dtype)
    u, p = factors(rows, cols, rank, dtype)
    gy, x = (torch.randn(24, n).to(DEVICE, dtype) for n in (rows, cols))
    be = get_backend("triton")
    monkeypatch.setattr(type(be), "backward", lambda *a, **k: pytest.fail("not fused"))
    dw, du, dp = be.linear_backward(gy, x, qw, u, p, order, 0.5, False)
    _, rdu, rdp = reference(qw, u, p, order, 0.5, gy.double().t() @ x.double())
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert dw is None and rel_err(du, rdu) < tol and rel_err(dp, rdp) < tol


def test_forward_many_takes_quantized_layers_one_by_one():
    """The grouped kernel reads dense W only: a quantized layer among dense ones is built
    by its own launch, the dense ones still grouped."""
    be = get_backend("triton")
    qw = quantized("nf4", 12, 64, torch.float32)
    dense = torch.randn(9, 40).to(DEVICE)
    us, ps = zip(factors(12, 64, 3, torch.float32), factors(9, 40, 3, torch.float32))
    outs = be.forward_many([qw, dense], us, ps, 2, [0.5, 0.25])
    assert torch.equal(outs[0], be.forward(qw, us[0], ps[0], 2, 0.5))
    assert torch.equal(outs[1], be.forward(dense, us[1], ps[1], 2, 0.25))


def test_refusals_name_the_reason():
    """A 4-bit weight with an odd column count (its rows start mid-byte) or a blocksize
    below 32 is refused with the reason; the torch backend still takes it."""
    be = get_backend("triton")
    odd = quantized("nf4", 6, 33, torch.float32)
    u, p = factors(6, 33, 2, torch.float32)
    (reason,) = be.not_supported_reasons(odd, u, p, 1)
    assert "odd number of columns (33)" in reason and "mid-byte" in reason
    assert get_backend("torch").not_supported_reasons(odd, u, p, 1) == []
    small = quant.QuantizedWeight("nf4", torch.zeros(102, dtype=torch.uint8, device=DEVICE),
                                  torch.ones(13, device=DEVICE), torch.Size((6, 34)),
                                  torch.float32, 16, odd.code)
    (reason,) = be.not_supported_reasons(small, u, torch.zeros(2, 34, device=DEVICE), 1)
    assert "blocksize must be even and at least 32" in reason and "got 16" in reason
    w8 = quantized("int8", 6, 33, torch.float32)  # one byte an element: any M
    assert be.not_supported_reasons(w8, u, p, 9) == ["order 9 > 8 (orders 0..8 or exact)"]
    assert triton_backend.QBLOCK_MIN == 32


def test_the_gate_tells_the_packed_bytes_loads_apart():
    """The kernel health gate (``dev.triton_aot``) checks the width of the loads of W's
    bytes alone, followed from the kernel's W parameter through the LLVM IR (a made-up
    excerpt: parameter 1 is W, 128 bits; parameter 0's 64-bit load is another tensor's)."""
    triton_aot = pytest.importorskip("dev.triton_aot")
    llir = "\n".join([
        '  %7 = getelementptr i8, ptr addrspace(1) %1, i64 %6, !dbg !71',
        '  %8 = phi ptr addrspace(1) [ %7, %4 ], [ %9, %5 ]',
        '  %9 = getelementptr i8, ptr addrspace(1) %8, i64 16',
        '  %10 = tail call { i32, i32, i32, i32 } asm sideeffect "mov.u32 $0, 0x0;\\0A\\09@$5 '
        'ld.global.v4.b32 { $0, $1, $2, $3 }, [ $4 + 0 ];", "=r,=r,=r,=r,l,b"'
        '(ptr addrspace(1) %9, i1 %p) #8, !dbg !72',
        '  %11 = getelementptr bfloat, ptr addrspace(1) %0, i64 %6',
        '  %12 = tail call { i32, i32 } asm sideeffect "@$3 ld.global.v2.b32 { $0, $1 }, '
        '[ $2 + 0 ];", "=r,=r,l,b"(ptr addrspace(1) %11, i1 %p) #8'])
    assert triton_aot.load_widths(llir, 1) == {128}
    assert triton_aot.load_widths(llir, 0) == {64}
    assert triton_aot.load_widths(llir, 2) == set()


def test_roofline_table_has_rows_for_each_stored_format():
    """``bench roofline`` predicts the quantized kernels beside the dense ones: every
    Linear case also in each stored format, reading fewer bytes than dense the narrower the
    codes, within a few percent of its floor in the forward."""
    from lie_kernels.bench import roofline
    from lie_kernels.bench.shapes import SWEEP
    rows = roofline.table(SWEEP)
    quant = [r for r in rows if r["w"] != "dense"]
    assert {r["case"] for r in quant} == {c.name for c in SWEEP if len(c.shape) == 2}
    assert {r["w"] for r in quant} == set(roofline.QUANTIZED_W)
    assert {r["dtype"] for r in quant} == set(roofline.QUANTIZED_DTYPES)
    fwd = {r["w"]: r for r in rows
           if (r["case"], r["dtype"], r["order"], r["kernel"]) == ("linear.4096x4096", "bf16", 1,
                                                                   "fwd")}
    assert fwd["nf4"]["MB"] < fwd["int8"]["MB"] == fwd["fp8"]["MB"] < fwd["dense"]["MB"]
    assert all(r["x_floor"] < 1.01 for r in fwd.values())


def test_roofline_counts_the_stored_bytes():
    """The roofline reads a quantized W as stored (codes and fp32 scales, once a pass): a
    bf16 W' written and, in the backward, g read in the compute dtype; no dW."""
    from lie_kernels.bench import roofline
    n = 4096 * 4096
    nf4 = n // 2 + 4 * n // 64
    int8 = n + 4 * 4096
    for kind, stored in (("nf4", nf4), ("int8", int8)):
        fwd = roofline.predict(4096, 4096, 16, "bf16", 1, "fwd", quantized=kind)
        bwd = roofline.predict(4096, 4096, 16, "bf16", 1, "bwd", quantized=kind)
        assert fwd["floor_bytes"] == bwd["floor_bytes"] == stored + 2 * n
        assert fwd["bytes"] - fwd["floor_bytes"] == 2 * 16 * 8192  # the factors, once
    dense = roofline.predict(4096, 4096, 16, "bf16", 1, "fwd")
    assert dense["floor_bytes"] == 4 * n
