"""Triton-specific checks; the shared value/gradient tests live in test_backends.py.

Here (no GPU) the kernels run in the Triton interpreter; on a GPU the same tests
run the compiled kernels. Compiling every shipped kernel for sm_80/sm_90 (and
reading its SASS) is tests/test_kernel_health.py; 64-bit offsets are
tests/test_indexing64.py.
"""
import math

import pytest
import torch

import lie_kernels as lk
from lie_kernels.backends import get_backend, select_backend, triton_backend, triton_configs

from helpers import Allocations, lowrank_inputs, ref_lowrank, rel_err

USABLE, WHY = lk.available_backends().get("triton", (False, "triton backend not registered"))
needs_triton = pytest.mark.skipif(not USABLE, reason=f"triton unusable here: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("shape,rank", [((130, 300), 5), ((70, 4, 9), 70), ((3, 1, 2), 128)],
                         ids=["multi-tile", "rank-pad-128", "max-rank"])
@pytest.mark.parametrize("order", [2, None])
def test_tiles_and_large_ranks(shape, rank, order):
    """Several row blocks and column tiles (the dp/du partial sums) and the widest rank tile."""
    w, a, b = lowrank_inputs(shape, rank, device=DEVICE)
    a, b = a.requires_grad_(), b.requires_grad_()
    out = lk.lie_weight_lowrank(w, a * 0.2, b, order=order, scale=0.5, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref, (rw, ra, rb) = ref_lowrank(w, (a * 0.2).detach(), b, order, 0.5)
    ref.backward(g.double().cpu())
    assert rel_err(out, ref) < 2e-6
    assert rel_err(b.grad, rb.grad) < 2e-5
    assert rel_err(a.grad, ra.grad * 0.2) < 2e-5


@needs_triton
def test_refusals_name_the_reason():
    be = get_backend("triton")
    w = torch.randn(4, 6, device=DEVICE)
    u, p = torch.randn(4, 129, device=DEVICE), torch.randn(129, 6, device=DEVICE)
    reasons = be.not_supported_reasons(w, u, p, 9)
    assert any("order 9 > 8" in r for r in reasons) and any("rank 129 > 128" in r
                                                           for r in reasons)
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot take these inputs: "
                                           r"dtype torch.float64"):
        lk.lie_weight_lowrank(w.double(), torch.randn(2, 6).double().to(DEVICE),
                              torch.randn(4, 2).double().to(DEVICE), backend="triton")


@needs_triton
def test_auto_picks_triton_only_on_gpu():
    w, a, b = lowrank_inputs((4, 6), 2, device=DEVICE)
    chosen = select_backend("auto", w, b, a, 1).name
    assert chosen == ("triton" if DEVICE == "cuda" else "torch")


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    """Both backward reductions: fp32 atomics (default) and ordered split sums
    (``torch.use_deterministic_algorithms(True)``)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


@needs_triton
@pytest.mark.parametrize("order", [1, 4])
def test_backward_is_deterministic(order):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        w, a, b = lowrank_inputs((96, 600), 8, device=DEVICE)
        a.requires_grad_()
        grads = []
        for _ in range(2):
            out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.3, backend="triton")
            (ga,) = torch.autograd.grad(out, a, torch.ones_like(out))
            grads.append(ga)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(grads[0], grads[1])


@needs_triton
@pytest.mark.parametrize("order", [1, 4, None])
@pytest.mark.parametrize("wdt,factors", [(torch.float32, torch.float32),
                                         (torch.float16, torch.float16),
                                         (torch.float16, torch.float32)],
                         ids=["f32", "f16", "f16-w-f32-factors"])
def test_both_reductions_match_fp64(monkeypatch, deterministic, order, wdt, factors):
    """Several row and column splits (in the interpreter: 16x16 tiles and 8 programs,
    so each program runs several row blocks and column tiles), a non-contiguous W,
    every factor gradient and dW, in either reduction, against the fp64 reference
    (fp16 factors: judged at their rounding)."""
    monkeypatch.setattr(triton_backend, "BWD_PROGRAMS", 8)
    monkeypatch.setattr(triton_backend, "_interp_config",
                        lambda rows, cols: triton_backend.Config(16, 16, 4, 1))
    w, a, b = lowrank_inputs((100, 4, 25), 12, device=DEVICE, noncontig=True)
    if DEVICE == "cpu":
        plan = triton_backend.bwd_plan(100, 100, triton_backend._interp_config(100, 100),
                                       atomic=not deterministic)
        assert (plan.row_splits, plan.col_splits, plan.rb_per, plan.ct_per) == (2, 4, 4, 2)
    a, b = a.to(factors).requires_grad_(), b.to(factors).requires_grad_()
    w = w.to(wdt).requires_grad_()
    out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.7, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref, (rw, ra, rb) = ref_lowrank(w, a, b, order, 0.7)
    ref.backward(g.double().cpu())
    tol = 2e-6 if wdt == torch.float32 else 2e-3
    assert rel_err(out, ref) < tol and rel_err(w.grad, rw.grad) < tol
    assert rel_err(a.grad, ra.grad) < tol and rel_err(b.grad, rb.grad) < tol
    assert a.grad.dtype == b.grad.dtype == factors


@needs_triton
@pytest.mark.parametrize("n", [512, 64])
@pytest.mark.parametrize("factors", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_backward_scratch_is_what_the_plan_says(monkeypatch, deterministic, factors, n):
    """The fp32 scratch the backward takes beyond its outputs is the plan's count (what
    the roofline reports): with atomics on a 512x512 fp16 W at rank 16 at most W/8
    (r(R+M) floats). What is added into comes from the reused workspace, left all
    zero; in deterministic mode the dp partials, which the kernel stores whole, come
    from a second reused pool that is never zeroed. So a second call allocates
    nothing but its outputs, two separate tensors."""
    w = torch.randn(n, n, device=DEVICE).half()
    u, p = (0.1 * torch.randn(n, 16, device=DEVICE)).to(factors), \
        (0.1 * torch.randn(16, n, device=DEVICE)).to(factors)
    taken, stored = [], []
    for pool, log in ((triton_backend._WORKSPACE, taken), (triton_backend._STORED, stored)):
        monkeypatch.setattr(pool, "take",
                            lambda n, device, real=pool.take, log=log: (log.append(n),
                                                                        real(n, device))[1])
    backward = triton_backend.BACKEND.backward
    backward(torch.randn_like(w), w, u, p, 2, 0.5, False)
    with Allocations() as seen:
        _, du, dp = backward(torch.randn_like(w), w, u, p, 2, 0.5, False)
    cfg = (triton_backend._interp_config(n, n) if DEVICE == "cpu"
           else triton_configs.config("bwd", "fp16", 16, factors == torch.float32))
    plan = triton_backend.bwd_plan(n, n, cfg, atomic=not deterministic)
    scratch, zeroed = plan.scratch_floats(n, n, 16), plan.zeroed_floats(n, n, 16)
    assert taken == [zeroed] * 2 and stored == ([scratch - zeroed] * 2 if deterministic else [])
    assert (zeroed < scratch) == deterministic
    outputs = {du.untyped_storage().data_ptr(), dp.untyped_storage().data_ptr()}
    assert len(outputs) == 2 and du.dtype == dp.dtype == factors
    # fp32 only: the interpreter's own buffers are uint8
    assert not [t for t in seen.tensors if t.dtype == torch.float32 and t.numel()
                and t.untyped_storage().data_ptr() not in outputs]
    for buf, clean in triton_backend._WORKSPACE._free.values():
        assert clean and not buf.any()
    if not deterministic and n == 512:
        assert 4 * scratch <= w.numel() * w.element_size() / 8


class _FailingLaunch:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("launch failed")
        return launch


@needs_triton
def test_deterministic_dp_partials_need_no_zeroing(monkeypatch):
    """The deterministic backward stores every dp partial, so the buffer may start as
    anything: filled with NaN it still gives the fp64 gradients (several row and
    column splits, ragged last tiles)."""
    monkeypatch.setattr(triton_backend, "BWD_PROGRAMS", 8)
    monkeypatch.setattr(triton_backend, "_interp_config",
                        lambda rows, cols: triton_backend.Config(16, 16, 4, 1))
    # a pool whose buffers start as NaN (what PyTorch's deterministic mode fills new
    # memory with anyway; explicit here so the test does not depend on that default)
    pool = triton_backend.Workspace(zeroed=False)
    monkeypatch.setattr(pool, "_new",
                        lambda n, device: torch.full((n,), float("nan"), device=device))
    monkeypatch.setattr(triton_backend, "_STORED", pool)
    w, a, b = lowrank_inputs((90, 5, 17), 6, device=DEVICE)
    a, b = a.requires_grad_(), b.requires_grad_()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = lk.lie_weight_lowrank(w, a, b, order=3, scale=0.7, backend="triton")
        g = torch.randn_like(out)
        out.backward(g)
    finally:
        torch.use_deterministic_algorithms(before)
    ref, (_, ra, rb) = ref_lowrank(w, a, b, 3, 0.7)
    ref.backward(g.double().cpu())
    assert rel_err(a.grad, ra.grad) < 2e-6 and rel_err(b.grad, rb.grad) < 2e-6


@needs_triton
def test_deterministic_backward_fills_no_scratch(monkeypatch):
    """Deterministic mode NaN-fills every fresh ``torch.empty``
    (``torch.utils.deterministic.fill_uninitialized_memory``): the backward's scratch
    must come from the reused pools, so after a first call nothing larger than a
    factor is filled or zeroed (du and dp, the outputs, are filled by PyTorch)."""
    monkeypatch.setattr(triton_backend, "BWD_PROGRAMS", 8)
    monkeypatch.setattr(triton_backend, "_interp_config",
                        lambda rows, cols: triton_backend.Config(16, 16, 4, 1))
    w, a, b = lowrank_inputs((100, 90), 8, dtype=torch.float16, device=DEVICE)
    g = torch.randn_like(w)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        plan = triton_backend.bwd_plan(100, 90, triton_backend._interp_config(100, 90), False)
        assert plan.row_splits > 1 and plan.scratch_floats(100, 90, 8) > a.numel()
        triton_backend.BACKEND.backward(g, w, b, a, 2, 0.5, False)
        with torch.profiler.profile(record_shapes=True) as prof:
            triton_backend.BACKEND.backward(g, w, b, a, 2, 0.5, False)
    finally:
        torch.use_deterministic_algorithms(before)
    filled = [math.prod(e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes]
    assert filled and max(filled) <= max(a.numel(), b.numel())


@needs_triton
def test_workspace_is_zeroed_again_after_a_failed_call(monkeypatch):
    """A backward that dies between its two launches leaves partial sums in the reused
    scratch; the next call must zero it first and still be right."""
    w = torch.randn(64, 80, device=DEVICE).half()
    u, p = 0.1 * torch.randn(64, 8, device=DEVICE).half(), \
        0.1 * torch.randn(8, 80, device=DEVICE).half()
    g = torch.randn_like(w)
    monkeypatch.setattr(triton_backend.kernels, "lie_reduce_kernel", _FailingLaunch())
    with pytest.raises(RuntimeError, match="launch failed"):
        triton_backend.BACKEND.backward(g, w, u, p, 3, 0.5, False)
    monkeypatch.undo()
    dirty = [buf for buf, clean in triton_backend._WORKSPACE._free.values() if not clean]
    assert dirty and dirty[0].any()
    _, du, dp = triton_backend.BACKEND.backward(g, w, u, p, 3, 0.5, False)
    _, ru, rp = get_backend("torch").backward(g.float(), w.float(), u.float(), p.float(), 3,
                                              0.5, False)
    assert rel_err(du, ru) < 2e-3 and rel_err(dp, rp) < 2e-3


@needs_triton
@pytest.mark.parametrize("order", [0, 1, 2, 8, None])
def test_infinite_weight_at_identity_init(order):
    """Δ = 0 (b = 0, LoRA's init) must give W' == W bitwise, ±inf included
    (W + W·expm1(0) would be inf + inf·0 = NaN)."""
    w, a, b = lowrank_inputs((5, 40), 3, device=DEVICE)
    w[0, 3], w[4, 39] = float("inf"), float("-inf")
    out = lk.lie_weight_lowrank(w, a, b * 0, order=order, scale=0.7, backend="triton")
    assert torch.equal(out, w)


class _Spy:
    """Wraps a Triton kernel; records the storage of every tensor it is launched with."""

    def __init__(self, kernel):
        self.kernel, self.storages = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.storages += [a.untyped_storage().data_ptr() for a in args
                              if isinstance(a, torch.Tensor)]
            return self.kernel[grid](*args, **kw)
        return launch


@needs_triton
@pytest.mark.parametrize("order", [1, None])
def test_channels_last_runs_in_place(monkeypatch, order):
    """A channels_last conv weight reaches the kernels as a view of its own storage
    (no W-sized copy); W' and dW come back channels_last; values match fp64."""
    w = torch.randn(6, 5, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    a = (torch.randn(4, 45, device=DEVICE) * 0.3).requires_grad_()
    b = (torch.randn(6, 4, device=DEVICE) * 0.3).requires_grad_()
    w.requires_grad_()
    fwd = _Spy(triton_backend.kernels.lie_fwd_kernel)
    bwd = _Spy(triton_backend.kernels.lie_bwd_kernel)
    monkeypatch.setattr(triton_backend.kernels, "lie_fwd_kernel", fwd)
    monkeypatch.setattr(triton_backend.kernels, "lie_bwd_kernel", bwd)
    out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.5, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)  # channels_last like out
    out.backward(g)
    storage = w.untyped_storage().data_ptr()
    assert storage in fwd.storages and storage in bwd.storages
    assert w.grad.is_contiguous(memory_format=torch.channels_last)
    ref, (rw, ra, rb) = ref_lowrank(w, a, b, order, 0.5)
    ref.backward(g.double().cpu())
    assert rel_err(out, ref) < 2e-6
    for got, exp in ((w.grad, rw.grad), (a.grad, ra.grad), (b.grad, rb.grad)):
        assert rel_err(got, exp) < 2e-5


@needs_triton
def test_grouped_launch_keeps_its_table_on_the_device(monkeypatch):
    """After the first call, the grouped forward copies nothing host-to-device (the
    backend's only such copy is ``_to_device``), yet sees in-place factor updates."""
    copies = []
    real = triton_backend._to_device
    monkeypatch.setattr(triton_backend, "_to_device",
                        lambda t, dev: copies.append(t.numel()) or real(t, dev))
    be = get_backend("triton")
    layers = [lowrank_inputs(shape, r, device=DEVICE)
              for shape, r in (((9, 20), 3), ((16, 4, 3, 3), 5), ((7, 33), 2))]
    ws = [lay[0] for lay in layers]
    ps, us = [lay[1] for lay in layers], [lay[2] for lay in layers]
    scales = [0.5, 1.0, 0.25]
    be.forward_many(ws, us, ps, 2, scales)
    first = len(copies)
    assert first > 0
    for step in range(2):
        for u in us:
            u.mul_(1.5)  # an optimizer step: same tensors, new values
        outs = be.forward_many(ws, us, ps, 2, scales)
        assert len(copies) == first, f"step {step}: host-to-device copies after the first call"
        for w, u, p, s, out in zip(ws, us, ps, scales, outs):
            ref, _ = ref_lowrank(w, p, u, 2, s)
            assert out.shape == w.shape and rel_err(out, ref) < 2e-6


@needs_triton
@pytest.mark.parametrize("order", [2, None])
def test_fp32_factors_with_fp16_weight(order):
    """PEFT keeps adapter factors in fp32 over a 16-bit W: W' in W's dtype, du/dp in
    the factors' dtype, within fp16 rounding of the fp64 reference."""
    w, a, b = lowrank_inputs((33, 70), 6, device=DEVICE)
    w = w.half()
    a, b = a.requires_grad_(), b.requires_grad_()
    out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.5, backend="triton")
    assert out.dtype == torch.float16
    g = torch.randn_like(out)
    out.backward(g)
    assert a.grad.dtype == b.grad.dtype == torch.float32
    ref, (rw, ra, rb) = ref_lowrank(w, a, b, order, 0.5)
    ref.backward(g.double().cpu())
    assert rel_err(out, ref) < 1e-3
    assert rel_err(a.grad, ra.grad) < 1e-3 and rel_err(b.grad, rb.grad) < 1e-3


@needs_triton
@pytest.mark.parametrize("order", [1, 3, None])
@pytest.mark.parametrize("factors", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("need_dw", [False, True], ids=["", "dW"])
def test_fused_linear_backward_matches_fp64(monkeypatch, order, factors, need_dw):
    """The Linear backward with dL/dW' = grad_yᵀ x fused into the Lie backward (16-bit
    W): du, dp and dW against fp64 of the same math, with odd sizes, several tiles
    of every axis, program groups of 2 row tiles (3 row tiles: the last group is
    short) and a non-contiguous x. The fused kernel must be what runs."""
    monkeypatch.setattr(triton_backend, "_interp_linear_config",
                        lambda rows, cols, n: triton_configs.Config(32, 32, 4, 1, block_n=16))
    monkeypatch.setattr(triton_backend, "LINEAR_GROUP", 2)
    monkeypatch.setattr(triton_backend.Backend, "linear_backward", None)  # no fallback
    n, c_out, c_in, r = 77, 70, 90, 6
    w = torch.randn(c_out, c_in, device=DEVICE).half()
    u = (0.3 * torch.randn(c_out, r, device=DEVICE)).to(factors)
    p = (0.3 * torch.randn(r, c_in, device=DEVICE)).to(factors)
    x = torch.randn(c_in, n, device=DEVICE).half().t()
    gy = torch.randn(n, c_out, device=DEVICE).half()
    assert not x.is_contiguous()
    dw, du, dp = triton_backend.BACKEND.linear_backward(gy, x, w, u, p, order, 0.5, need_dw)
    ref, (rw, rp, ru) = ref_lowrank(w, p, u, order, 0.5)
    ref.backward(gy.double().cpu().t() @ x.double().cpu())
    # fp16 factors round on output; on a GPU the rank contractions also round u, p and
    # t to fp16 for the tensor cores (the interpreter runs them in fp32)
    tol = 1e-5 if factors == torch.float32 and DEVICE == "cpu" else 2e-3
    assert du.dtype == dp.dtype == factors
    assert rel_err(du, ru.grad) < tol and rel_err(dp, rp.grad) < tol
    if need_dw:
        assert dw.dtype == torch.float16 and rel_err(dw, rw.grad) < 2e-3
    else:
        assert dw is None


@needs_triton
def test_fused_linear_backward_steps_aside_when_it_should(monkeypatch):
    """fp32 W and deterministic mode take the default path (form dL/dW', then the
    backward with split partials); a 16-bit W otherwise does not."""
    calls = []
    real = triton_backend.Backend.linear_backward
    monkeypatch.setattr(triton_backend.Backend, "linear_backward",
                        lambda self, *a: (calls.append(a[2].dtype), real(self, *a))[1])
    be = triton_backend.BACKEND
    w, u, p = torch.randn(8, 12, device=DEVICE), torch.randn(8, 2, device=DEVICE), \
        torch.randn(2, 12, device=DEVICE)
    x, gy = torch.randn(5, 12, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    be.linear_backward(gy, x, w, u, p, 1, 0.5, False)
    be.linear_backward(gy.half(), x.half(), w.half(), u, p, 1, 0.5, False)
    torch.use_deterministic_algorithms(True)
    try:
        be.linear_backward(gy.half(), x.half(), w.half(), u, p, 1, 0.5, False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == [torch.float32, torch.float16]


def test_workspace_is_never_shared_by_concurrent_calls():
    """Threads taking scratch at once each get an all-zero buffer that no other thread
    holds meanwhile (the pool hands its buffer to one caller; the others get fresh ones)."""
    import threading
    import time
    from lie_kernels.backends.workspace import Workspace
    ws, lock, held, clashes = Workspace(), threading.Lock(), set(), []

    def call(i):
        for _ in range(20):
            with ws.take(64 + i, torch.device("cpu")) as buf:
                ptr = buf.data_ptr()
                with lock:
                    clashes.extend([ptr] if ptr in held else [])
                    held.add(ptr)
                assert not buf.any()
                buf.fill_(i + 1)  # what the kernels leave before the finish step
                time.sleep(0.001)
                buf.zero_()       # the finish kernel
                with lock:
                    held.discard(ptr)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes


@needs_triton
def test_scratch_past_the_workspace_cap_is_allocated_per_call(monkeypatch):
    from lie_kernels.backends import workspace
    w = torch.randn(48, 72, device=DEVICE).half()
    u, p = 0.1 * torch.randn(48, 4, device=DEVICE).half(), \
        0.1 * torch.randn(4, 72, device=DEVICE).half()
    g = torch.randn_like(w)
    _, du0, dp0 = triton_backend.BACKEND.backward(g, w, u, p, 2, 0.5, False)
    monkeypatch.setattr(workspace, "MAX_FLOATS", 16)
    with Allocations() as seen:
        _, du, dp = triton_backend.BACKEND.backward(g, w, u, p, 2, 0.5, False)
    assert any(t.numel() == 4 * (48 + 72) for t in seen.tensors)  # zeroed per call
    assert torch.equal(du, du0) and torch.equal(dp, dp0)


@needs_triton
@pytest.mark.parametrize("wdt", [torch.float32, torch.float16], ids=["f32", "f16-w-f32-factors"])
def test_compiled_backward_returns_gradients_that_share_no_memory(wdt):
    """The backward custom op may not return du and dp as views of one buffer (it did
    with fp32 factors, and torch.compile refused the graph): compile the fused op on
    Triton and backpropagate, for the weight op and for a fused Linear layer."""
    from lie_kernels.ops import weight as weight_op
    w = torch.randn(32, 48, device=DEVICE).to(wdt)
    u = torch.randn(32, 4, device=DEVICE, requires_grad=True)
    p = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    f = torch.compile(lambda w, u, p: weight_op.apply(w, u, p, 2, 0.5, "triton"),
                      backend="aot_eager", fullgraph=True)
    f(w, u, p).float().sum().backward()
    ref, (_, rp, ru) = ref_lowrank(w, p, u, 2, 0.5)
    ref.sum().backward()
    tol = 2e-6 if wdt == torch.float32 else 2e-3
    assert rel_err(u.grad, ru.grad) < tol and rel_err(p.grad, rp.grad) < tol


def test_workspace_is_not_pooled_while_a_cuda_graph_is_captured(monkeypatch):
    """During capture every call gets its own buffer and nothing enters the pool."""
    from lie_kernels.backends import workspace
    monkeypatch.setattr(workspace, "_capturing", lambda device: True)
    ws = workspace.Workspace()
    for _ in range(2):
        with ws.take(8, torch.device("cpu")) as buf:
            assert not buf.any()
        assert not ws._free


@needs_triton
def test_fused_linear_backward_of_an_empty_batch():
    w = torch.randn(24, 40, device=DEVICE).half()
    u, p = torch.randn(24, 4, device=DEVICE).half(), torch.randn(4, 40, device=DEVICE).half()
    gy, x = torch.randn(0, 24, device=DEVICE).half(), torch.randn(0, 40, device=DEVICE).half()
    dw, du, dp = triton_backend.BACKEND.linear_backward(gy, x, w, u, p, 1, 0.5, True)
    assert not du.any() and not dp.any() and not dw.any()
