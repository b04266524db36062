"""torch.compile: the fused op traces as one custom op (no graph breaks) and matches eager."""
import pytest
import torch
from torch import nn

import lie_kernels as lk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _functional(parametrization, order):
    def fn(w, x, *factors):
        if parametrization == "lowrank":
            b, a = factors
            w2 = lk.lie_weight_lowrank(w, a, b, order=order, scale=0.5)
        else:
            core, *us = factors
            w2 = lk.lie_weight(w, core, us, order=order, scale=0.5)
        return nn.functional.conv2d(x, w2).square().mean()
    return fn


def _inputs(parametrization, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g)
    x = torch.randn(2, 4, 5, 5, generator=g)
    if parametrization == "lowrank":
        factors = [torch.randn(6, 2, generator=g), torch.randn(2, 36, generator=g)]
    else:
        factors = [torch.randn(2, 2, 2, 2, generator=g)] + [
            torch.randn(d, 2, generator=g) for d in w.shape]
    factors = [(f * 0.3).to(device).requires_grad_() for f in factors]
    return w.to(device), x.to(device), factors


def _value_and_grads(fn, w, x, factors):
    loss = fn(w, x, *factors)
    return [loss, *torch.autograd.grad(loss, factors)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parametrization,order", [("tucker", 1), ("tucker", None),
                                                   ("lowrank", 4)])
def test_functional_fullgraph_matches_eager(device, parametrization, order):
    fn = _functional(parametrization, order)
    w, x, factors = _inputs(parametrization, device)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    for got, want in zip(_value_and_grads(compiled, w, x, factors),
                         _value_and_grads(fn, w, x, factors)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _model(device):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 5))
    lk.inject(m, rank=2, order=2)
    with torch.no_grad():  # move off the zero init so the update is not trivially zero
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return m.to(device)


def test_injected_model_has_no_graph_breaks():
    m = _model("cpu")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(torch.randn(2, 3, 6, 6))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_injected_model_compiled_matches_eager(device, backend):
    m = _model(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    params = [p for p in m.parameters() if p.requires_grad]

    def step(model):
        loss = model(x).logsumexp(-1).mean()
        return [loss, *torch.autograd.grad(loss, params)]

    torch._dynamo.reset()
    want = step(m)
    got = step(torch.compile(m, backend=backend))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
