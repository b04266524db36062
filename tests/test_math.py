"""exp_series, mode_product and tucker against independent float64 formulas."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lie_kernels as lk
from lie_kernels.reference import lie_weight_ref

from helpers import rand, rel_err


@pytest.mark.parametrize("order", list(range(0, 11)) + [None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_exp_series_values(order, dtype):
    x = torch.linspace(-3, 3, 97, dtype=torch.float64)
    want = torch.exp(x) if order is None else sum(x ** k / math.factorial(k)
                                                  for k in range(order + 1))
    got = lk.exp_series(x.to(dtype), order)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-3,
           torch.bfloat16: 8e-3}[dtype]
    # low precision: the input itself is rounded, so compare on the rounded input
    xr = x.to(dtype).double()
    want = torch.exp(xr) if order is None else sum(xr ** k / math.factorial(k)
                                                   for k in range(order + 1))
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("order", [1, 2, 5, None])
def test_exp_series_derivative_is_lower_order(order):
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lk.exp_series(x, order).sum(), x)
    want = torch.exp(x) if order is None else lk.exp_series(x, order - 1)
    assert torch.allclose(g, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [0, 1, 2, -1])
def test_mode_product_matches_loops(mode):
    x = rand(3, 4, 5, dtype=torch.float64, noncontig=True)
    m = mode % 3
    u = rand(6, x.shape[m], dtype=torch.float64)
    y = lk.mode_product(x, u, mode)
    want_shape = list(x.shape)
    want_shape[m] = 6
    assert list(y.shape) == want_shape
    want = torch.zeros(want_shape, dtype=torch.float64)
    for idx in itertools.product(*map(range, want_shape)):
        j = idx[m]
        acc = 0.0
        for i in range(x.shape[m]):
            src = list(idx)
            src[m] = i
            acc += x[tuple(src)].item() * u[j, i].item()
        want[idx] = acc
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


def test_tucker_matches_explicit_sum():
    core = rand(2, 3, 2, dtype=torch.float64)
    u = [rand(4, 2, dtype=torch.float64), None, rand(3, 2, dtype=torch.float64)]
    t = lk.tucker(core, u)
    assert t.shape == (4, 3, 3)
    for o, i, h in itertools.product(range(4), range(3), range(3)):
        acc = sum(core[a, i, c].item() * u[0][o, a].item() * u[2][h, c].item()
                  for a in range(2) for c in range(2))
        assert abs(t[o, i, h].item() - acc) < 1e-12


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lie_weight_random_shapes(data):
    """Property: any 2-5 dim weight, any ranks (None modes included), any order."""
    ndim = data.draw(st.integers(2, 5))
    shape = [data.draw(st.integers(1, 6)) for _ in range(ndim)]
    ranks, factors = [], []
    for d in shape:
        if data.draw(st.booleans()):
            ranks.append(d)
            factors.append(None)
        else:
            r = data.draw(st.integers(1, 4))
            ranks.append(r)
            factors.append(torch.randn(d, r) * 0.5)
    order = data.draw(st.sampled_from([0, 1, 2, 3, 6, None]))
    scale = data.draw(st.floats(-2, 2, allow_nan=False))
    w = torch.randn(shape)
    core = torch.randn(ranks) * 0.5
    out = lk.lie_weight(w, core, factors, order=order, scale=scale, backend="torch")
    ref = lie_weight_ref(w.double(), core.double(),
                         [None if f is None else f.double() for f in factors], order, scale)
    assert rel_err(out, ref) < 2e-6
