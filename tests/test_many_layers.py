"""The many-layer build: same values and gradients as one layer at a time."""
import pytest
import torch
from torch import nn

import lie_kernels as lk
from lie_kernels.ops import lie_gemm_many

from conftest import backend_cases
from helpers import rel_err


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 5, 1),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 7)).to(device)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("order", [1, 4, None])
def test_batched_model_matches_per_layer(backend, device, order):
    model = lk.inject(_model(device), rank=3, order=order, backend=backend)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lie_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, 8, 8, device=device)
    y_ref = model(x)
    y_ref.square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    handle = lk.nn.batch_builds(model)
    y = model(x)
    assert all(m.prebuilt is None for _, m in lk.nn.lie_layers(model))  # cleared after forward
    y.square().sum().backward()
    handle.remove()
    assert rel_err(y, y_ref) < 1e-5
    for n, g in ref.items():
        assert rel_err(dict(model.named_parameters())[n].grad, g) < 1e-5, n


@pytest.mark.parametrize("backend,device", backend_cases())
def test_lie_gemm_many_values(backend, device):
    ws = [torch.randn(5, 7, device=device), torch.randn(3, 2, 3, 3, device=device)[:, :, ::2],
          torch.randn(40, 1, device=device)]
    us = [torch.randn(w.shape[0], r, device=device) for w, r in zip(ws, (1, 3, 17))]
    ps = [torch.randn(u.shape[1], w[0].numel(), device=device) * 0.2 for w, u in zip(ws, us)]
    outs = lie_gemm_many(ws, us, ps, [0.5, -1.0, 2.0], 2, backend)
    for w, u, p, s, out in zip(ws, us, ps, [0.5, -1.0, 2.0], outs):
        ref = lk.reference.lie_weight_lowrank_ref(w.double(), p.double(), u.double(), 2, s)
        assert out.shape == w.shape and rel_err(out, ref) < 2e-6
