"""Merge and unmerge (exact round trips, merges that never destroy weights, tied weights,
all-or-nothing over a model) and checkpoints that carry the update's definition."""
import math

import pytest
import torch
from torch import nn

import lie_kernels as lk

from helpers import lowrank_linear, randomised, three_layer_model, ulps

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = [0, 1, 2, 3, 8, None]


# -- the exact exp round trip ---------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 4, None])
def test_100_merge_unmerge_cycles_drift_at_most_2_ulp(order):
    layer = randomised(lk.nn.LieConv2d(nn.Conv2d(6, 8, 3), rank=3, order=order, alpha=3.0))
    w0 = layer.base.weight.detach().clone()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    drift = ulps(layer.base.weight.detach(), w0).max().item()
    assert drift <= 2, f"order={order}: {drift} ulp after 100 cycles"


# -- merges that would lose weights are refused ---------------------------------------
@pytest.mark.parametrize("dtype,w,d,kind", [
    (torch.float16, 1.0, -20.0, "underflow"),
    (torch.float16, 100.0, 7.0, "overflow"),
    (torch.bfloat16, 1e30, 30.0, "overflow"),
    (torch.float32, 1e-30, -40.0, "underflow"),
], ids=["fp16-under", "fp16-over", "bf16-over", "fp32-under"])
def test_merge_refuses_what_unmerge_cannot_restore(dtype, w, d, kind):
    layer = lowrank_linear([d, 0.0, 0.1], [1.0, 0.5], w, None, dtype)
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"cannot merge exactly: \d+ of 6 entries of the "
                                         rf"{dtype} weight.*[1-9]\d* {kind}"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)  # left unchanged


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("order", [1, 2, 3, None])
def test_every_accepted_merge_unmerges_within_1_ulp(dtype, order):
    # weights spread ever wider over the dtype's range (up to 2^±0.95·emax), updates up
    # to e^±10: the wide trials get refused, every accepted merge must come back
    accepted = 0
    for trial in range(12):
        torch.manual_seed(trial)
        layer = lk.nn.LieLinear(nn.Linear(9, 7, bias=False).to(dtype), rank=2, order=order)
        with torch.no_grad():
            spread = math.log2(torch.finfo(dtype).max) * 0.95 * trial / 11
            mag = (torch.rand(7, 9, dtype=torch.float64) * 2 - 1) * spread
            layer.base.weight.copy_(torch.randn(7, 9, dtype=torch.float64).sign() * 2 ** mag)
            layer.lie_a.copy_(torch.randn(2, 9) * (0.3 + trial / 3))
            layer.lie_b.copy_(torch.randn(7, 2) * (0.3 + trial / 3))
        w0 = layer.base.weight.detach().clone()
        try:
            layer.merge()
        except ValueError:
            assert torch.equal(layer.base.weight, w0)
            continue
        accepted += 1
        layer.unmerge()
        assert ulps(layer.base.weight.detach(), w0).max().item() <= 1
    assert accepted > 0


def test_16bit_tucker_layer_merge_builds_delta_in_fp32():
    layer = lk.nn.LieConv2d(nn.Conv2d(2, 3, 3, bias=False).half(), rank=(1, 1, 1, 1), order=2)
    with torch.no_grad():
        layer.base.weight.fill_(1.0)
        layer.lie_core.fill_(300.0)
        layer.lie_u0.fill_(1e-4)
        layer.lie_u1.fill_(300.0)
        layer.lie_u2.fill_(1.0)
        layer.lie_u3.fill_(1.0)
    before = layer.adapted_weight()
    layer.merge()
    assert torch.isfinite(layer.base.weight).all()
    torch.testing.assert_close(layer.base.weight, before, rtol=2e-3, atol=0)


# -- checkpoints carry order, scale and parametrization --------------------------------
def _lin(order=3, alpha=4.0, parametrization="lowrank", seed=0):
    torch.manual_seed(seed)
    return randomised(lk.nn.LieLinear(nn.Linear(6, 5), rank=2, order=order, alpha=alpha,
                                      parametrization=parametrization))


@pytest.mark.parametrize("change,msg", [
    (dict(order=4), r"order=3.*order=4"),
    (dict(alpha=8.0), r"scale=2\.0.*scale=4\.0"),
    (dict(order=None), r"order=3.*order=None"),
])
def test_mismatched_checkpoint_is_refused(change, msg):
    sd = _lin().state_dict()
    other = _lin(**{**dict(order=3, alpha=4.0), **change})
    with pytest.raises(RuntimeError, match=r"lie_config: the checkpoint's update is .*" + msg):
        other.load_state_dict(sd)


def test_checkpoint_round_trip_and_old_checkpoints_load():
    src = _lin(seed=1)
    x = torch.randn(3, 6)
    dst = _lin(seed=2)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    old = {k: v for k, v in src.state_dict().items() if k != "lie_config"}
    dst = _lin(seed=3)
    dst.load_state_dict(old)  # strict: a checkpoint from before lie_config still loads
    assert torch.equal(dst(x), src(x))


def test_config_survives_dtype_casts_and_is_saved_after_reassignment():
    layer = _lin()
    layer.half()
    assert layer.state_dict()["lie_config"].dtype == torch.int64
    layer.order = 5
    with pytest.raises(RuntimeError, match=r"order=5.*order=3"):
        _lin().load_state_dict(layer.state_dict())


def test_unmerge_with_another_order_is_refused():
    layer = _lin(order=3)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    merged = layer.base.weight.detach().clone()
    layer.order = 4
    with pytest.raises(ValueError, match=r"merged with order=3.*now has order=4"):
        layer.unmerge()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"unmerge: layer '0'.*merged with order=3"):
        lk.unmerge(model)
    assert layer.merged and torch.equal(layer.base.weight, merged)
    layer.order = 3
    layer.unmerge()
    assert ulps(layer.base.weight.detach(), w0).max() <= 1


def test_merged_checkpoint_loaded_then_unmerged():
    src = _lin(order=2)
    w0 = src.base.weight.detach().clone()
    src.merge()
    dst = _lin(order=2, seed=5)
    dst.load_state_dict(src.state_dict())
    assert dst.merged
    dst.unmerge()
    assert ulps(dst.base.weight.detach(), w0).max() <= 1


# -- tied weights ----------------------------------------------------------------------------
def _tied_model():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight  # one Parameter in two adapted layers
    model = nn.Sequential(first, nn.Tanh(), second)
    with pytest.warns(UserWarning, match="share one weight Parameter"):
        lk.inject(model, rank=2, order=2)
    for m in (model[0], model[2]):
        randomised(m)
    return model


def test_tied_weights_are_not_merged_twice():
    model = _tied_model()
    w0 = model[0].base.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"share one weight Parameter \(tied weights\)"):
        lk.merge(model)
    assert not model[0].merged and not model[2].merged
    assert torch.equal(model[0].base.weight, w0)
    model[0].merge()  # one layer alone may merge; its tied partner then refuses
    with pytest.raises(RuntimeError, match=r"tied \(one Parameter\) to another LieLinear"):
        model[2].merge()
    model[0].unmerge()
    model[2].merge()  # once the first is unmerged, the weight is free again
    model[2].unmerge()


def test_merged_model_pickles_and_unmerges_after_load(tmp_path):
    model = _tied_model()
    lk.merge(nn.Sequential(model[0]))  # merge one of the tied pair
    w0 = model[0].base.weight.detach().clone()
    torch.save(model, tmp_path / "m.pt")  # merge bookkeeping must not make W unpicklable
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded[0].merged and torch.equal(loaded[0].base.weight, w0)
    with pytest.raises(RuntimeError, match="tied"):
        loaded[2].merge()
    lk.unmerge(loaded)


def test_exact_exp_merge_error_does_not_suggest_the_exact_exp():
    layer = lowrank_linear([-200.0, 0.5], [1.0, 1.0], 1.0, None)  # exp(-200) = 0 in fp32
    with pytest.raises(ValueError, match=r"2 where exp\(scale·Δ\) is 0") as info:
        layer.merge()
    assert "order=None" not in str(info.value) and "even order" not in str(info.value)
    odd = lowrank_linear([-1.0, 0.5], [1.0, 1.0], 1.0, 1)  # 1 + (-1) = 0
    with pytest.raises(ValueError, match=r"an even order keeps exp_K strictly positive"):
        odd.merge()


def test_merge_and_unmerge_of_a_partly_merged_model():
    model = three_layer_model()
    x = torch.randn(5, 4)
    y0 = model(x).detach()
    w0 = [m.base.weight.detach().clone() for _, m in lk.nn.lie_layers(model)]
    model[2].merge()
    lk.merge(model)  # skips the merged layer instead of stopping there
    assert all(m.merged for _, m in lk.nn.lie_layers(model))
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-5)
    model[0].unmerge()
    lk.unmerge(model)
    for (_, m), w in zip(lk.nn.lie_layers(model), w0):
        assert not m.merged and ulps(m.base.weight.detach(), w).max() <= 1


def test_model_merge_is_all_or_nothing():
    model = three_layer_model(order=1)
    with torch.no_grad():  # the last layer's update is not invertible: 1 + sΔ = 0
        model[4].lie_a.fill_(1.0)
        model[4].lie_b.fill_(-0.5)  # rank 2: Δ = -1
    w0 = [m.base.weight.detach().clone() for _, m in lk.nn.lie_layers(model)]
    with pytest.raises(ValueError, match=r"merge: layer '4': cannot merge exactly.*"
                                         r"no layer was merged"):
        lk.merge(model)
    for (_, m), w in zip(lk.nn.lie_layers(model), w0):
        assert not m.merged and torch.equal(m.base.weight, w)
