"""Trust under abuse (issue 12): exact round trips, merges that never destroy weights,
thread-safe first use, inf at identity, fp16 Tucker intermediates, checkpoints that carry
the update's definition, tied weights, bounded order, PEFT padding modes, clear errors."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lie_kernels as lk
from lie_kernels.reference import lie_weight_ref

from conftest import backend_cases
from helpers import f64, outputs_and_grads, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = [0, 1, 2, 3, 8, None]


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the spacing of ``want``'s dtype above |want| (nextafter)."""
    mag = want.abs()
    up = torch.nextafter(mag, torch.tensor(math.inf, dtype=want.dtype)) - mag
    down = mag - torch.nextafter(mag, torch.tensor(0.0, dtype=want.dtype))
    step = torch.where(torch.isinf(up), down, up).double()  # the largest finite number
    diff = (got.double() - want.double()).abs() / step
    return torch.where(got == want, torch.zeros_like(diff), diff)


def lowrank_linear(delta_rows, delta_cols, w, order, dtype=torch.float32):
    """A LieLinear with W = ``w`` and Δ = outer(delta_rows, delta_cols), scale 1."""
    out_f, in_f = len(delta_rows), len(delta_cols)
    base = nn.Linear(in_f, out_f, bias=False).to(dtype)
    layer = lk.nn.LieLinear(base, rank=1, order=order, scale=1.0)
    with torch.no_grad():
        base.weight.copy_(torch.as_tensor(w, dtype=torch.float64).expand(out_f, in_f))
        layer.lie_b.copy_(torch.tensor(delta_rows, dtype=torch.float64)[:, None])
        layer.lie_a.copy_(torch.tensor(delta_cols, dtype=torch.float64)[None, :])
    return layer


def randomised(layer, std=0.3):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lie_"):
                p.copy_(torch.randn_like(p, dtype=torch.float32) * std)
    return layer


# -- 1. the exact exp round trip ---------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 4, None])
def test_100_merge_unmerge_cycles_drift_at_most_2_ulp(order):
    layer = randomised(lk.nn.LieConv2d(nn.Conv2d(6, 8, 3), rank=3, order=order, alpha=3.0))
    w0 = layer.base.weight.detach().clone()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    drift = ulps(layer.base.weight.detach(), w0).max().item()
    assert drift <= 2, f"order={order}: {drift} ulp after 100 cycles"


# -- 2. merges that would lose weights are refused ---------------------------------------
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


# -- 3. thread-safe first use -------------------------------------------------------------
THREADS_SCRIPT = textwrap.dedent("""
    import threading, lie_kernels as lk
    from lie_kernels.backends import _MODULES, get_backend
    barrier, errors, seen = threading.Barrier(8), [], []
    def first_use():
        barrier.wait()
        try:
            names = sorted(lk.available_backends())
            for name in names:
                get_backend(name)
            seen.append(len(names))
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    assert seen == [len(_MODULES)] * 8, seen
    print("ok")
""")


def test_concurrent_first_use_from_8_threads(request):
    runs = 20 if request.config.getoption("--slow") else 3
    env = dict(os.environ, TRITON_INTERPRET="1")
    for run in range(runs):
        res = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "ok" in res.stdout, f"run {run}: {res.stderr[-2000:]}"


# -- 4. inf / -inf in W at identity --------------------------------------------------------
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


# -- 5. 16-bit Tucker intermediates in fp32 ------------------------------------------------
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


# -- 6. checkpoints carry order, scale and parametrization --------------------------------
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


# -- 7. tied weights -------------------------------------------------------------------------
def _tied_model():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight  # one Parameter in two adapted layers
    model = nn.Sequential(first, nn.Tanh(), second)
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


# -- 8. the order is bounded ------------------------------------------------------------
def test_order_is_bounded():
    w, a, b = torch.randn(4, 4), torch.randn(1, 4), torch.randn(4, 1)
    for bad in (65, 10 ** 6, 10 ** 9):
        with pytest.raises(ValueError, match=rf"order must be an int >= 0 and <= MAX_ORDER=64"
                                             rf".*got {bad}"):
            lk.lie_weight_lowrank(w, a, b, order=bad)
        with pytest.raises(ValueError, match="MAX_ORDER=64"):
            lk.nn.LieLinear(nn.Linear(4, 4), order=bad)
    torch.testing.assert_close(lk.lie_weight_lowrank(w, a, b, order=64),
                               lk.lie_weight_lowrank(w, a, b, order=None), rtol=1e-6, atol=1e-6)


# -- 9. patch_hira on convs with non-zero padding modes ------------------------------------
class PaddedNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3, padding=1, padding_mode=mode)
        self.z = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x):
        return self.z(self.c(x))


def _hira(mode):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    torch.manual_seed(0)
    model = peft.get_peft_model(PaddedNet(mode), peft.HiraConfig(r=2, target_modules=["c", "z"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_B" in n:
                p.normal_(0, 0.3)
    return model




@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_patch_hira_keeps_peft_numbers_for_padded_convs(mode):
    model = _hira(mode)
    from lie_kernels.integrations.peft import patch_hira
    x = torch.randn(2, 3, 7, 6)
    want = outputs_and_grads(model, x)
    with patch_hira(model) as patch:
        assert len(patch.layers) == 1 and len(patch.fallbacks) == 1
        (name, why), = patch.fallbacks.items()
        assert name.endswith(".c") and f"padding_mode={mode!r}" in why
        got = outputs_and_grads(model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_patch_hira_merged_semantics_match_peft_merged_model(mode):
    model = _hira(mode)
    from lie_kernels.integrations.peft import patch_hira
    x = torch.randn(2, 3, 7, 6)
    with patch_hira(model, padding_semantics="merged") as patch:
        assert len(patch.layers) == 2 and not patch.fallbacks
        got = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"padding_semantics must be one of \('peft', "
                                         r"'merged'\), got 'zeros'"):
        patch_hira(_hira(mode), padding_semantics="zeros")


# -- 10. clear errors for bad input -------------------------------------------------------
def _err(fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.parametrize("case", [
    "core_none", "rank0", "alpha", "int8", "parametrization", "nan_scale", "inf_scale",
    "nan_alpha", "nan_scale_layer"])
def test_bad_input_errors(case):
    w = torch.randn(5, 4)
    lin = nn.Linear(4, 5)
    int8 = nn.Linear(4, 5)
    int8.weight = nn.Parameter(int8.weight.detach().to(torch.int8), requires_grad=False)
    cases = {
        "core_none": (lambda: lk.lie_weight(w, None, [None, None]), TypeError,
                      r"core must be a torch.Tensor, got NoneType"),
        "rank0": (lambda: lk.lie_weight(w, torch.randn(0, 4), [torch.randn(5, 0), None]),
                  ValueError, r"core must have every rank >= 1, got shape \(0, 4\)"),
        "alpha": (lambda: lk.nn.LieLinear(lin, alpha="x"), TypeError,
                  r"alpha must be a real number, got str 'x'"),
        "int8": (lambda: lk.nn.LieLinear(int8), TypeError,
                 r"base.weight must be a floating-point tensor.*got dtype torch.int8"),
        "parametrization": (lambda: lk.nn.LieLinear(lin, parametrization=""), ValueError,
                            r"parametrization must be one of \('tucker', 'lowrank'\), got ''"),
        "nan_scale": (lambda: lk.lie_weight(w, torch.randn(2, 4), [torch.randn(5, 2), None],
                                            scale=math.nan), ValueError,
                      r"scale must be a finite real number, got nan"),
        "inf_scale": (lambda: lk.lie_weight_lowrank(w, torch.randn(1, 4), torch.randn(5, 1),
                                                    scale=-math.inf), ValueError,
                      r"scale must be a finite real number, got -inf"),
        "nan_alpha": (lambda: lk.nn.LieLinear(lin, alpha=math.nan), ValueError,
                      r"alpha must be a finite real number, got nan"),
        "nan_scale_layer": (lambda: lk.nn.LieLinear(lin, scale=math.inf), ValueError,
                            r"scale must be a finite real number, got inf"),
    }
    _err(*cases[case])


def test_exact_exp_merge_error_does_not_suggest_the_exact_exp():
    layer = lowrank_linear([-200.0, 0.5], [1.0, 1.0], 1.0, None)  # exp(-200) = 0 in fp32
    with pytest.raises(ValueError, match=r"2 where exp\(scale·Δ\) is 0") as info:
        layer.merge()
    assert "order=None" not in str(info.value) and "even order" not in str(info.value)
    odd = lowrank_linear([-1.0, 0.5], [1.0, 1.0], 1.0, 1)  # 1 + (-1) = 0
    with pytest.raises(ValueError, match=r"an even order keeps exp_K strictly positive"):
        odd.merge()


def test_double_backward_and_forward_ad_say_not_implemented():
    w, a, b = torch.randn(5, 4), torch.randn(2, 4, requires_grad=True), torch.randn(5, 2)
    out = lk.lie_weight_lowrank(w, a, b, order=2)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), a, create_graph=True)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        lk.lie_weight_lowrank(w, fwAD.make_dual(a.detach(), torch.ones_like(a)), b, order=2)


@pytest.mark.parametrize("features", [6, 300])  # the two-node and the one-node layer path
def test_layer_double_backward_says_not_implemented(features):
    layer = randomised(lk.nn.LieLinear(nn.Linear(features, features), rank=2))
    y = layer(torch.randn(3, features)).square().sum()
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y, layer.lie_a, create_graph=True)


def test_double_backward_under_compile_says_not_implemented():
    from lie_kernels import ops
    w, a, b = torch.randn(5, 4), torch.randn(2, 4, requires_grad=True), torch.randn(5, 2)
    out = ops.lie_gemm(w, b, a, 2, 1.0, "torch")  # the custom op torch.compile sees
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), a, create_graph=True)


def _three_layer_model(order=2):
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                                    nn.Linear(6, 3)), rank=2, order=order)
    for _, m in lk.nn.lie_layers(model):
        randomised(m)
    return model


def test_merge_and_unmerge_of_a_partly_merged_model():
    model = _three_layer_model()
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
    model = _three_layer_model(order=1)
    with torch.no_grad():  # the last layer's update is not invertible: 1 + sΔ = 0
        model[4].lie_a.fill_(1.0)
        model[4].lie_b.fill_(-0.5)  # rank 2: Δ = -1
    w0 = [m.base.weight.detach().clone() for _, m in lk.nn.lie_layers(model)]
    with pytest.raises(ValueError, match=r"merge: layer '4': cannot merge exactly.*"
                                         r"no layer was merged"):
        lk.merge(model)
    for (_, m), w in zip(lk.nn.lie_layers(model), w0):
        assert not m.merged and torch.equal(m.base.weight, w)


def test_batch_builds_clears_prebuilt_weights_after_an_exception():
    model = _three_layer_model()
    handle = lk.nn.batch_builds(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(5, 3))  # wrong width: fails after the pre-hook built every W'
    assert all(m.prebuilt is None for _, m in lk.nn.lie_layers(model))
    with torch.no_grad():
        model[0].lie_b.add_(1.0)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model[0](x), nn.functional.linear(
        x, model[0].adapted_weight(), model[0].base.bias))
    handle.remove()


# -- determinism (README "Numerical promises") --------------------------------------------
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
