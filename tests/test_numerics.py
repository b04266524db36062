"""Numerical promises of every backend: W at the identity bitwise (inf included), 16-bit
Tucker intermediates without overflow, bitwise reproducible outputs and gradients."""
import math

import pytest
import torch
from torch import nn

import lie_kernels as lk
from lie_kernels.reference import lie_weight_ref

from conftest import backend_cases
from helpers import f64, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = [0, 1, 2, 3, 8, None]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_identity_keeps_inf_bitwise(backend, device, dtype, order):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip(f"{backend} kernels take fp32/fp16/bf16 only (not_supported_reasons)")
    w = torch.randn(6, 11, dtype=torch.float64).to(dtype=dtype, device=device)
    w[0, 0], w[3, 7], w[5, 10] = math.inf, -math.inf, 0.0
    a = torch.randn(3, 11, dtype=dtype, device=device)
    b = torch.zeros(6, 3, dtype=dtype, device=device)
    assert torch.equal(lk.lie_weight_lowrank(w, a, b, order=order, backend=backend), w)
    factors = [torch.randn(6, 2, dtype=dtype, device=device), None]
    core = torch.zeros(2, 11, dtype=dtype, device=device)
    assert torch.equal(lk.lie_weight(w, core, factors, order=order, backend=backend), w)


@pytest.mark.parametrize("order", ORDERS)
def test_lie_layers_at_init_keep_inf_bitwise(order):
    lin = nn.Linear(12, 5)
    conv = nn.Conv2d(3, 4, 3)
    for base in (lin, conv):
        with torch.no_grad():
            base.weight.view(-1)[0] = math.inf
            base.weight.view(-1)[-1] = -math.inf
        layer = lk.nn.LAYER_TYPES[type(base)](base, rank=2, order=order)
        assert torch.equal(layer.adapted_weight(), base.weight)
        x = torch.randn(2, 12) if base is lin else torch.randn(1, 3, 5, 5)
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0, equal_nan=True)


# -- 16-bit Tucker intermediates in fp32 ------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", [2, None])
def test_16bit_tucker_intermediates_do_not_overflow(backend, device, dtype, order):
    # P = core x_2 U_2 = 9e4 > fp16's 65504, yet Δ = U_1 @ P = 9 and W' are representable
    w = torch.full((3, 4), 1.0, dtype=dtype, device=device)
    core = torch.full((1, 1), 300.0, dtype=dtype, device=device, requires_grad=True)
    u0 = torch.full((3, 1), 1e-4, dtype=dtype, device=device, requires_grad=True)
    u1 = torch.full((4, 1), 300.0, dtype=dtype, device=device, requires_grad=True)
    out = lk.lie_weight(w, core, [u0, u1], order=order, backend=backend)
    g = torch.rand(3, 4, dtype=torch.float64).to(dtype=dtype, device=device)
    grads = torch.autograd.grad(out, [core, u0, u1], g)
    ref_in = [f64(core), f64(u0), f64(u1)]
    ref = lie_weight_ref(f64(w), ref_in[0], ref_in[1:], order)
    ref_grads = torch.autograd.grad(ref, ref_in, g.to("cpu", torch.float64))
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert torch.isfinite(out).all() and rel_err(out, ref) < tol
    for got, want in zip(grads, ref_grads):
        if want.abs().max() < torch.finfo(dtype).max:  # dL/dU_1 ~ 1e9 overflows fp16 itself
            assert torch.isfinite(got).all() and rel_err(got, want) < tol
    assert torch.isfinite(grads[0]).all()  # dL/dcore: inf before P was built in fp32


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("order", [2, None])
def test_same_inputs_give_bitwise_same_outputs_and_gradients(backend, device, order):
    def run():
        torch.manual_seed(7)
        w = torch.randn(9, 5, 3, device=device)
        core = torch.randn(3, 2, 3, device=device, requires_grad=True)
        factors = [torch.randn(9, 3, device=device, requires_grad=True),
                   torch.randn(5, 2, device=device, requires_grad=True), None]
        out = lk.lie_weight(w, core, factors, order=order, scale=0.7, backend=backend)
        out.backward(torch.randn_like(out))
        return [out.detach(), core.grad, factors[0].grad, factors[1].grad]
    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
