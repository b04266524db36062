"""Lie layers, inject, merge/unmerge and state_dict round trips."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lie_kernels as lk
from lie_kernels.reference import lie_weight_lowrank_ref, lie_weight_ref

# (base layer, input shape): all four layer types, grouped and depthwise included
LAYERS = [
    (lambda: nn.Linear(13, 7), (3, 13)),
    (lambda: nn.Conv1d(6, 9, 3, stride=2, padding=1, groups=3), (2, 6, 11)),
    (lambda: nn.Conv2d(5, 7, 3, padding=2, dilation=2), (2, 5, 9, 8)),
    (lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), (1, 8, 10, 10)),  # depthwise
    (lambda: nn.Conv2d(4, 6, (1, 3), bias=False, padding_mode="reflect", padding=(0, 1)),
     (2, 4, 5, 6)),
    (lambda: nn.Conv3d(4, 6, 3, groups=2, padding=1), (1, 4, 5, 4, 6)),
]
IDS = ["linear", "conv1d-grouped", "conv2d-dilated", "conv2d-depthwise", "conv2d-reflect",
       "conv3d-grouped"]


def _wrap(base, parametrization, order, rank=3):
    layer = lk.nn.LAYER_TYPES[type(base)](base, rank=rank, parametrization=parametrization,
                                         order=order, alpha=1.5)
    with torch.no_grad():  # move away from the identity init
        for name, p in layer.named_parameters():
            if name.startswith("lie_"):
                p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _ref_weight(layer):
    """Float64 W' from the layer's own parameters, via the naive reference."""
    w = layer.base.weight.double()
    if layer.parametrization == "lowrank":
        return lie_weight_lowrank_ref(w, layer.lie_a.double(), layer.lie_b.double(),
                                      layer.order, layer.scale)
    factors = [None if f is None else f.double() for f in layer.factors()]
    return lie_weight_ref(w, layer.lie_core.double(), factors, layer.order, layer.scale)


def _forward_with(base, x, weight):
    bias = None if base.bias is None else base.bias.double()
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return base.double()._conv_forward(x, weight, bias)


@pytest.mark.parametrize("make,xshape", LAYERS, ids=IDS)
@pytest.mark.parametrize("parametrization", ["tucker", "lowrank"])
@pytest.mark.parametrize("order", [1, 4, None])
def test_layer_forward_and_grads_match_reference(make, xshape, parametrization, order):
    base = make()
    layer = _wrap(copy.deepcopy(base), parametrization, order)
    x = torch.randn(xshape)
    y = layer(x)
    y.square().sum().backward()
    ref_layer = copy.deepcopy(layer).double()
    yr = _forward_with(ref_layer.base, x.double(), _ref_weight(ref_layer))
    yr.square().sum().backward()
    assert torch.allclose(y.double(), yr, rtol=1e-5, atol=1e-5)
    for (name, p), (_, pr) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if name.startswith("lie_"):
            assert torch.allclose(p.grad.double(), pr.grad, rtol=1e-4, atol=1e-5), name
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


@pytest.mark.parametrize("make,xshape", LAYERS, ids=IDS)
@pytest.mark.parametrize("parametrization", ["tucker", "lowrank"])
def test_identity_at_init(make, xshape, parametrization):
    base = make()
    layer = lk.nn.LAYER_TYPES[type(base)](copy.deepcopy(base), rank=2,
                                         parametrization=parametrization, order=3)
    x = torch.randn(xshape)
    assert torch.equal(layer.adapted_weight(), base.weight)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("make,xshape", LAYERS, ids=IDS)
@pytest.mark.parametrize("order", [2, 4, None])
@pytest.mark.parametrize("parametrization", ["tucker", "lowrank"])
def test_merge_unmerge_round_trip(make, xshape, order, parametrization):
    layer = _wrap(make(), parametrization, order)
    with torch.no_grad():
        layer.base.weight.view(-1)[::5] = 0.0  # zeros never move
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(xshape)
    y0 = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), y0, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.base.weight.view(-1)[::5], w0.view(-1)[::5])
    layer.unmerge()
    assert not layer.merged
    rel = ((layer.base.weight - w0).abs().max() / w0.abs().max()).item()
    assert rel < 1e-6
    assert torch.allclose(layer(x), y0, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_non_invertible_update():
    layer = lk.nn.LieLinear(nn.Linear(3, 2), rank=1, order=1)
    with torch.no_grad():
        layer.lie_a.fill_(1.0)
        layer.lie_b.fill_(-1.0)  # 1 + sΔ = 0 everywhere
    with pytest.raises(ValueError, match="cannot merge exactly"):
        layer.merge()
    assert not layer.merged


def test_merge_twice_and_unmerge_unmerged():
    layer = lk.nn.LieLinear(nn.Linear(3, 2), rank=1)
    with pytest.raises(RuntimeError, match="is not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trip(merged):
    make, xshape = LAYERS[5]
    torch.manual_seed(0)
    base = make()
    layer = _wrap(copy.deepcopy(base), "tucker", 2)
    if merged:
        layer.merge()
    x = torch.randn(xshape)
    sd = layer.state_dict()
    fresh = lk.nn.LieConv3d(copy.deepcopy(base), rank=3, order=2, alpha=1.5)
    fresh.load_state_dict(sd)
    assert fresh.merged == merged
    assert torch.equal(fresh(x), layer(x))


def test_rank_per_mode_and_identity_factors():
    layer = lk.nn.LieConv2d(nn.Conv2d(16, 32, 3), rank=(4, 5, 3, 2))
    assert layer.ranks == (4, 5, 3, 2)
    assert layer.lie_u2 is None  # full rank on a 3-wide mode: identity, no parameters
    assert tuple(layer.lie_u3.shape) == (3, 2)
    assert layer.scale == 1.0
    layer = lk.nn.LieConv2d(nn.Conv2d(16, 32, 3), rank=8, alpha=16)
    assert layer.ranks == (8, 8, 3, 3) and layer.scale == 2.0


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_inject_by_type_name_and_regex():
    torch.manual_seed(0)
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    y0 = model.eval()(x)
    lk.inject(model, target_modules=[nn.Conv2d], rank=2, order=4)
    assert isinstance(model[0], lk.nn.LieConv2d) and isinstance(model[3][0], lk.nn.LieConv2d)
    assert isinstance(model[6], nn.Linear)  # untouched
    assert torch.equal(model(x), y0)  # identity at init
    assert not model[0].base.weight.requires_grad and not model[0].base.bias.requires_grad
    # PEFT-like: everything but the factors is frozen (trainable= keeps modules, see
    # test_model.py)
    assert not model[1].weight.requires_grad and not model[6].weight.requires_grad
    trainable, adapter, base = lk.trainable_parameters(model)
    lie = sum(p.numel() for n, p in model.named_parameters() if "lie_" in n)
    assert trainable == adapter == lie and base == sum(p.numel() for p in _net().parameters())

    model = lk.inject(_net(), target_modules=["3.1", r"[06]"], rank=2)
    assert isinstance(model[3][1], lk.nn.LieConv2d) and isinstance(model[0], lk.nn.LieConv2d)
    assert isinstance(model[6], lk.nn.LieLinear) and isinstance(model[3][0], nn.Conv2d)

    model = lk.inject(_net())  # default: every supported layer
    assert len(list(lk.nn.lie_layers(model))) == 4


def test_model_merge_unmerge_and_training_step():
    torch.manual_seed(0)
    model = lk.inject(_net(), rank=2, order=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(model(x), t)
    loss.backward()
    opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lie_core" in n)
    model.eval()
    y = model(x)
    lk.merge(model)
    assert torch.allclose(model(x), y, rtol=1e-5, atol=1e-5)
    lk.unmerge(model)
    assert torch.allclose(model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_layer_merge(dtype):
    layer = _wrap(nn.Conv2d(4, 6, 3).to(dtype), "tucker", 2)
    x = torch.randn(1, 4, 6, 6, dtype=dtype)
    y0 = layer(x).float()
    layer.merge()
    y1 = layer(x).float()
    assert ((y1 - y0).abs().max() / y0.abs().max()).item() < 2e-2
    layer.unmerge()
    assert layer.base.weight.dtype == dtype


def test_fp32_factors_with_16_bit_weight():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.randn(9, 7, dtype=dtype)
        a, b = torch.randn(3, 7, requires_grad=True), torch.randn(9, 3, requires_grad=True)
        got = lk.lie_weight_lowrank(w, a, b, order=2, scale=0.1)
        x = 0.1 * (b.double() @ a.double())
        ref = w.double() * (1 + x + x * x / 2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -7, atol=0)
        got.float().sum().backward()
        assert a.grad.dtype == b.grad.dtype == torch.float32
    with pytest.raises(TypeError, match=r"b must have the weight's dtype torch.float32, "
                                        r"got torch.float64"):
        lk.lie_weight_lowrank(w.float(), a.double(), b.double())
