"""CUDA backend: what can be checked without a GPU runs here; the rest runs on one.

Here (no GPU): the shared series header built for the host against float64; the
extension built once (nvcc + torch binding), loaded, its ops, fakes and backward
split rule checked; the static gate on every kernel instance of that build (SASS:
no spills, >= 2 blocks/SM, <= 64 KB shared memory, 128-bit loads and stores); the
Python layout logic (channels_last without a W-sized copy) against a stand-in
kernel. On a GPU (skipped here with the reason): the kernels against the float64
reference on both load paths, with reduction splits, layouts, mixed factor dtypes,
inf at identity, determinism and 64-bit offsets. test_backends.py runs the "cuda"
backend like every other backend on a GPU as well.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lie_kernels as lk
from dev import sass
from lie_kernels import cuda_build
from dev import cuda_report
from lie_kernels.backends import cuda_backend
from lie_kernels.reference import lie_weight_lowrank_ref

from helpers import lowrank_inputs, rand, ref_lowrank, rel_err

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()
HAS_NVCC = cuda_build.cuda_home() is not None and torch.version.cuda is not None
ORDERS = [0, 1, 2, 3, 4, 8, None]
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _series_ref(order, x):
    if order == -1:
        return math.exp(x), math.expm1(x), math.exp(x)
    e = sum(x ** k / math.factorial(k) for k in range(order + 1))
    de = sum(x ** k / math.factorial(k) for k in range(order)) if order > 0 else 0.0
    return e, e - 1.0, de


def test_series_header_host_build(tmp_path):
    """csrc/lie_series.cuh built by g++ for the host, every order, against float64,
    including W' = lie_apply(W, expm1_K) and W' == W for an infinite W at x = 0."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) on this machine")
    exe = tmp_path / "series"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "csrc" / "series_host_test.cpp"), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen, zeros = set(), 0
    for line in lines.splitlines():
        order, x, *got = line.split()
        order, x = int(order), float(x)
        seen.add(order)
        exp_k, expm1_k, dexp_k, w_fin, w_inf, w_ninf = map(float, got)
        for g, want in zip((exp_k, expm1_k, dexp_k), _series_ref(order, x)):
            assert abs(g - want) <= 1e-6 * max(1.0, abs(want)), (order, x, g, want)
        want = 1.5 * _series_ref(order, x)[0]  # W' = W exp_K(x) for a finite W
        assert abs(w_fin - want) <= 1e-6 * max(1.0, abs(want)), (order, x, w_fin, want)
        if x == 0.0:  # identity: an infinite W comes back as itself, not NaN
            assert (w_inf, w_ninf) == (math.inf, -math.inf), (order, w_inf, w_ninf)
            zeros += 1
    assert zeros == 10
    assert seen == set(range(-1, 9))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fresh build of the extension (nvcc + JIT link) for this test module."""
    if not HAS_NVCC:
        pytest.skip("needs nvcc and a CUDA build of torch to compile the extension "
                    f"(cuda_home={cuda_build.cuda_home()}, torch.version.cuda="
                    f"{torch.version.cuda})")
    out = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, LIE_KERNELS_BUILD_DIR=str(out), MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "-m", "lie_kernels.cuda_build"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, env


CHECK = """
import torch
from lie_kernels.backends import cuda_backend as cb
ops = cb.load(); assert ops is not None, cb._STATE
print(ops.forward.default._schema); print(ops.backward.default._schema)
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    w = torch.empty(6, 5, 3, 3); u = torch.empty(6, 2); p = torch.empty(2, 45)
    print(tuple(ops.forward(w, u, p, 1, 0.5).shape))
    print([tuple(t.shape) for t in ops.backward(w, w, u, p, 1, 0.5, False)])
shapes = [(R, M, r, dt) for R in (1, 7, 300, 4096, 152064) for M in (9, 1000, 4096, 5120)
          for r in (1, 8, 16, 32) for dt in (torch.float32, torch.float16, torch.bfloat16)]
for R, M, r, dt in shapes:
    print(R, M, r, dt.itemsize, *ops.backward_splits(R, M, r, dt))
"""


@pytest.mark.slow
def test_extension_links_loads_and_registers_ops(built):
    out, env = built
    assert (out / f"{cuda_build.EXT_NAME}.so").exists()
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("lie_kernels_cuda::forward(Tensor weight, Tensor u, Tensor p, "
                               "int order, float scale) -> Tensor")
    assert lines[1].startswith("lie_kernels_cuda::backward(Tensor grad")
    assert lines[2] == "(6, 5, 3, 3)"
    assert lines[3] == "[(0,), (6, 2), (2, 45)]"
    # the backward's fixed splits: partials <= W/8 wherever R and M leave room for them
    checked = 0
    for line in lines[4:]:
        R, M, r, elt, col_splits, row_splits, ws = map(int, line.split())
        assert ws == r * (col_splits * R + row_splits * M)
        assert 1 <= col_splits <= 64 and 1 <= row_splits <= 64
        if min(R, M) * elt >= 64 * r:
            assert 4 * ws <= R * M * elt / 8, (R, M, r, elt, col_splits, row_splits)
            checked += 1
    assert checked > 50


@pytest.mark.slow
def test_static_gate_every_kernel_instance(built):
    """SASS of the build's object: 0 spills/stack, >= 2 blocks/SM, <= 64 KB smem,
    LDG.E.128 and STG.E.128 in every fwd/bwd instance (sass.check_row)."""
    out, _ = built
    print((out / "ptxas.txt").read_text())  # the register/spill report, kept in the test log
    rows = cuda_report.rows_from_object(out / "lie_kernels.o")
    print(sass.format_table(rows))
    archs = cuda_build.arch_list()
    assert {r["arch"] for r in rows} == set(archs)
    kinds = {(r["kernel"], r["dtype"], r["order"], r["arch"]) for r in rows}
    assert len(kinds) == len(rows) == len(archs) * 3 * (2 * 10 + 1)  # fwd+bwd x 10 orders + finish
    for r in rows:
        assert sass.check_row(r) == [], r
        if r["kernel"] != "cuda finish":
            assert r["ldg128"] and r["stg128"] and r["regs"] <= 128, r
    assert cuda_build.spill_report(out) == []


class _StandInOps:
    """The op contract computed by torch: W as given (any strides), W' and dW returned
    as contiguous tensors of W's shape; records the W each call received."""

    def __init__(self):
        self.weights = []

    def forward(self, weight, u, p, order, scale):
        self.weights.append(weight)
        w2 = weight.reshape(weight.shape[0], -1)
        out = lie_weight_lowrank_ref(w2, p, u, None if order == -1 else order, scale)
        return out.reshape(weight.shape).contiguous()

    def backward(self, grad, weight, u, p, order, scale, need_dw):
        self.weights.append(weight)
        w2 = weight.reshape(weight.shape[0], -1).detach().requires_grad_()
        u, p = u.detach().requires_grad_(), p.detach().requires_grad_()
        out = lie_weight_lowrank_ref(w2, p, u, None if order == -1 else order, scale)
        dw, du, dp = torch.autograd.grad(out, [w2, u, p], grad.reshape(out.shape))
        return dw.reshape(weight.shape).contiguous(), du, dp


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d, "row_sliced": torch.contiguous_format}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reaches_kernel_without_copy(monkeypatch, layout):
    """W in its own memory order: W itself (its storage, no W-sized copy) reaches the
    kernel, W' and dW come back in W's layout, and p/dp columns are permuted
    consistently (checked against float64)."""
    shape = (6, 5, 3, 3, 2) if layout == "channels_last_3d" else (6, 5, 3, 4)
    w = rand(*shape, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    if layout == "row_sliced":
        w = rand(12, *shape[1:], dtype=torch.float64)[::2]
    u = rand(6, 3, dtype=torch.float64, scale=0.5)
    p = rand(3, w[0].numel(), dtype=torch.float64, scale=0.5)
    g = rand(*shape, dtype=torch.float64)
    ops = _StandInOps()
    monkeypatch.setattr(cuda_backend, "load", lambda build=False: ops)
    be = cuda_backend.BACKEND
    out = be.forward(w, u, p, 2, 0.7)
    dw, du, dp = be.backward(g, w, u, p, 2, 0.7, True)
    for seen in ops.weights:
        assert seen.dim() == 2 and seen.data_ptr() == w.data_ptr()
        assert seen.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    want_strides = torch.empty(shape).contiguous(memory_format=LAYOUTS[layout]).stride()
    assert out.stride() == dw.stride() == want_strides
    ref, (rw, rp, ru) = ref_lowrank(w, p, u, 2, 0.7)
    assert rel_err(out, ref) < 1e-12
    want = torch.autograd.grad(ref, [rw, ru, rp], g)
    for got, exp in zip((dw, du, dp), want):
        assert rel_err(got, exp) < 1e-12


# --- on a GPU -------------------------------------------------------------------------

def _cuda_ready():
    usable, why = lk.available_backends()["cuda"]
    if not usable:
        pytest.skip(f"cuda backend unusable: {why}")


def _tol(dtype):
    return {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


# (W shape, rank, layout): odd widths take the scalar path; 2-D widths that are multiples
# of 8 the 128-bit path; (256, 1000) and (640, 512) split both reductions across blocks.
GPU_CASES = [((300, 7, 3, 3), 13, "contiguous"), ((256, 1000), 13, "contiguous"),
             ((640, 512), 4, "contiguous"), ((64, 24, 3, 3), 7, "channels_last"),
             ((33, 40), 32, "noncontig"), ((5, 3), 1, "contiguous")]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,rank,layout", GPU_CASES, ids=str)
def test_cuda_against_float64(dtype, order, shape, rank, layout):
    _cuda_ready()
    w, a, b = lowrank_inputs(shape, rank, dtype=dtype, device="cuda",
                             noncontig=layout == "noncontig")
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    a.requires_grad_()
    b.requires_grad_()
    out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.5, backend="cuda")
    g = rand(*shape, dtype=dtype, device="cuda")
    ga, gb = torch.autograd.grad(out, [a, b], g)
    ref, (_, ra, rb) = ref_lowrank(w, a, b, order, 0.5)
    ra_g, rb_g = torch.autograd.grad(ref, [ra, rb], g.double().cpu())
    assert out.dtype == dtype and out.stride() == w.contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else
        torch.contiguous_format).stride()
    assert rel_err(out, ref) < _tol(dtype)
    if order != 0:
        assert rel_err(ga, ra_g) < 10 * _tol(dtype) and rel_err(gb, rb_g) < 10 * _tol(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_factors_with_16bit_weight(dtype):
    _cuda_ready()
    w = rand(256, 1000, dtype=dtype, device="cuda")
    u, p = rand(256, 8, device="cuda", scale=0.5), rand(8, 1000, device="cuda", scale=0.5)
    be = cuda_backend.BACKEND
    out = be.forward(w, u, p, 3, 0.5)
    dw, du, dp = be.backward(w, w, u, p, 3, 0.5, True)
    assert out.dtype == dw.dtype == dtype and du.dtype == dp.dtype == torch.float32
    ref, (rw, rp, ru) = ref_lowrank(w, p, u, 3, 0.5)
    assert rel_err(out, ref) < _tol(dtype)
    want = torch.autograd.grad(ref, [rw, ru, rp], w.double().cpu())
    for got, exp in zip((dw, du, dp), want):
        assert rel_err(got, exp) < 10 * _tol(dtype)


@needs_gpu
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_inf_weight_is_kept_bitwise_at_identity(order, dtype):
    _cuda_ready()
    for shape in [(64, 512), (9, 7, 3)]:  # vector and scalar paths
        w = rand(*shape, dtype=dtype, device="cuda")
        w.view(-1)[::5] = float("inf")
        w.view(-1)[1::5] = float("-inf")
        u = torch.zeros(shape[0], 4, dtype=dtype, device="cuda")
        p = rand(4, w[0].numel(), dtype=dtype, device="cuda")
        out = cuda_backend.BACKEND.forward(w, u, p, order, 0.5)
        assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           w.view(torch.int16 if dtype != torch.float32 else torch.int32))


@needs_gpu
def test_backward_is_bitwise_reproducible():
    _cuda_ready()
    w, a, b = lowrank_inputs((640, 512), 8, dtype=torch.bfloat16, device="cuda")
    g = rand(640, 512, dtype=torch.bfloat16, device="cuda")
    runs = [cuda_backend.BACKEND.backward(g, w, b, a, 2, 0.5, True) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))


@needs_gpu
def test_offsets_past_2_31_elements():
    """A (3, 16) fp16 view whose rows sit 2**30 + 8 elements apart: int64 offsets."""
    _cuda_ready()
    storage = torch.zeros(2 ** 31 + 64, dtype=torch.float16, device="cuda")
    w = storage.as_strided((3, 16), (2 ** 30 + 8, 1))
    w.copy_(rand(3, 16, dtype=torch.float16, device="cuda"))
    u, p = rand(3, 2, device="cuda", scale=0.5), rand(2, 16, device="cuda", scale=0.5)
    out = cuda_backend.BACKEND.forward(w, u, p, 1, 0.5)
    dw, du, dp = cuda_backend.BACKEND.backward(w, w, u, p, 1, 0.5, True)
    ref, (rw, rp, ru) = ref_lowrank(w, p, u, 1, 0.5)
    assert rel_err(out, ref) < _tol(torch.float16)
    want = torch.autograd.grad(ref, [rw, ru, rp], w.double().cpu())
    for got, exp in zip((dw, du, dp), want):
        assert rel_err(got, exp) < 10 * _tol(torch.float16)


@needs_gpu
def test_weight_of_more_than_2_31_elements():
    """Forward on a (2**16 + 3, 2**15) bf16 W (4.3 GB): rows around element 2**31 against
    the float64 reference of those rows."""
    _cuda_ready()
    rows, cols = 2 ** 16 + 3, 2 ** 15
    w = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    u, p = rand(rows, 4, device="cuda", scale=0.5), rand(4, cols, device="cuda", scale=0.5)
    out = cuda_backend.BACKEND.forward(w, u, p, 2, 0.5)
    pick = torch.tensor([0, 1, 2 ** 16 - 1, 2 ** 16, rows - 1], device="cuda")
    ref, _ = ref_lowrank(w[pick], p, u[pick], 2, 0.5)
    assert rel_err(out[pick], ref) < _tol(torch.bfloat16)
