"""Triton-specific checks; the shared value/gradient tests live in test_backends.py.

Here (no GPU) the kernels run in the Triton interpreter; on a GPU the same tests
run the compiled kernels. The AOT test compiles every shipped kernel for sm_80
and sm_90 in a process without the interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

import lie_kernels as lk
from lie_kernels.backends import get_backend, select_backend

from helpers import lowrank_inputs, ref_lowrank, rel_err

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


@needs_triton
@pytest.mark.parametrize("order", [1, 4])
def test_backward_is_deterministic(order):
    w, a, b = lowrank_inputs((96, 600), 8, device=DEVICE)
    a.requires_grad_()
    grads = []
    for _ in range(2):
        out = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.3, backend="triton")
        (ga,) = torch.autograd.grad(out, a, torch.ones_like(out))
        grads.append(ga)
    assert torch.equal(grads[0], grads[1])


def test_kernels_compile_for_sm80_and_sm90():
    """Every shipped kernel through the real GPU compiler (ptxas included), no GPU needed."""
    pytest.importorskip("triton")
    from lie_kernels.backends import triton_aot
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lie_kernels.backends.triton_aot", "80", "90"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = [ln for ln in proc.stdout.splitlines() if ln.startswith("compiled ")]
    assert len(compiled) == 2 * len(list(triton_aot.cases()))
