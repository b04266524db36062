"""Bad input gets a clear error that names the argument, expected and given."""
import pytest
import torch
from torch import nn

import lie_kernels as lk
import math
from helpers import randomised, resnet18


def _tucker():
    return torch.randn(6, 5, 3, 3), torch.randn(2, 2, 3, 3), [torch.randn(6, 2),
                                                                torch.randn(5, 2), None, None]


@pytest.mark.parametrize("order,exc,msg", [
    (-1, ValueError, "order must be an int >= 0"),
    (1.5, TypeError, "got float 1.5"),
    (True, TypeError, "got bool"),
    ("2", TypeError, "got str"),
])
def test_bad_order(order, exc, msg):
    w, core, f = _tucker()
    with pytest.raises(exc, match=msg):
        lk.lie_weight(w, core, f, order=order)
    with pytest.raises(exc, match=msg):
        lk.exp_series(w, order)


def test_wrong_number_of_factors():
    w, core, f = _tucker()
    with pytest.raises(ValueError, match=r"expected 4, got 3"):
        lk.lie_weight(w, core, f[:3])


def test_factor_not_matching_mode_or_core():
    w, core, f = _tucker()
    f[1] = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"factors\[1\] must have shape \(5, 2\).*got \(4, 2\)"):
        lk.lie_weight(w, core, f)
    w, core, f = _tucker()
    f[0] = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"factors\[0\] must have shape \(6, 2\).*got \(6, 3\)"):
        lk.lie_weight(w, core, f)
    w, core, f = _tucker()
    f[2] = None
    core = torch.randn(2, 2, 2, 3)
    with pytest.raises(ValueError, match=r"factors\[2\] is None.*core.shape\[2\].*=3, got 2"):
        lk.lie_weight(w, core, f)


def test_core_dims():
    w, core, f = _tucker()
    with pytest.raises(ValueError, match=r"core must have one mode per weight dim: expected 4"):
        lk.lie_weight(w, core[0], f[:3])


def test_mismatched_dtype_and_device():
    w, core, f = _tucker()
    f[0] = f[0].double()
    with pytest.raises(TypeError, match=r"factors\[0\] must have the weight's dtype "
                                        r"torch.float32, got torch.float64"):
        lk.lie_weight(w, core, f)
    w, core, f = _tucker()
    with pytest.raises(TypeError, match=r"core must have the weight's dtype"):
        lk.lie_weight(w, core.half(), f)
    w, core, f = _tucker()
    f[1] = f[1].to("meta")
    with pytest.raises(ValueError, match=r"factors\[1\] must be on the weight's device cpu, "
                                         r"got meta"):
        lk.lie_weight(w, core, f)


def test_lowrank_shapes():
    w = torch.randn(6, 5, 3)
    with pytest.raises(ValueError, match=r"b must have shape \(6, r\).*got \(5, 2\)"):
        lk.lie_weight_lowrank(w, torch.randn(2, 15), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"a must have shape \(2, 15\), got \(2, 14\)"):
        lk.lie_weight_lowrank(w, torch.randn(2, 14), torch.randn(6, 2))
    with pytest.raises(TypeError, match=r"a must have the weight's dtype"):
        lk.lie_weight_lowrank(w, torch.randn(2, 15).double(), torch.randn(6, 2))


def test_bad_weight():
    _, core, f = _tucker()
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor.*torch.int64"):
        lk.lie_weight(torch.ones(6, 5, 3, 3, dtype=torch.long), core, f)
    with pytest.raises(ValueError, match=r"weight must have 2 to 5 dims.*got shape \(6,\)"):
        lk.lie_weight_lowrank(torch.randn(6), torch.randn(1, 1), torch.randn(6, 1))
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor or a lie_kernels.quant."
                                        r"QuantizedWeight, got list"):
        lk.lie_weight([1.0], core, f)


def test_bad_scale_and_backend():
    w, core, f = _tucker()
    with pytest.raises(TypeError, match=r"scale must be a real number, got str"):
        lk.lie_weight(w, core, f, scale="1")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*'torch'.*got 'fast'"):
        lk.lie_weight(w, core, f, backend="fast")


def test_unusable_backend_says_why():
    w, core, f = _tucker()
    for name, (usable, why) in lk.available_backends().items():
        if not usable:
            with pytest.raises(RuntimeError, match=f"backend '{name}' cannot take"):
                lk.lie_weight(w, core, f, backend=name)


def test_mode_product_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"u must have shape \(J, 4\) to act on mode 1"):
        lk.mode_product(x, torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match=r"mode must be an int in \[-2, 2\)"):
        lk.mode_product(x, torch.randn(2, 3), 2)


def test_inject_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"module '1' is a BatchNorm2d; supported layers"):
        lk.inject(model, target_modules=["0", "1"])
    with pytest.raises(TypeError, match=r"cannot adapt layer type BatchNorm2d"):
        lk.inject(model, target_modules=[nn.BatchNorm2d])
    with pytest.raises(ValueError, match=r"no module of Sequential matches"):
        lk.inject(model, target_modules="nothing_here")
    with pytest.raises(TypeError, match=r"LieConv2d wraps an nn.Conv2d, got ConvTranspose2d"):
        lk.nn.LieConv2d(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"rank must be an int >= 1 or one int >= 1 per weight"):
        lk.nn.LieConv2d(nn.Conv2d(3, 4, 3), rank=(2, 2))
    with pytest.raises(ValueError, match=r"parametrization must be one of"):
        lk.nn.LieLinear(nn.Linear(3, 4), parametrization="cp")


def test_backend_name_checked_at_construction():
    for build in (lambda: lk.nn.LieLinear(nn.Linear(4, 3), backend="gpu"),
                  lambda: lk.nn.LieConv2d(nn.Conv2d(3, 4, 3), backend="gpu"),
                  lambda: lk.inject(nn.Sequential(nn.Linear(4, 3)), backend="gpu")):
        with pytest.raises(ValueError, match=r"backend must be 'auto' or one of "
                                             r"\['cuda', 'torch', 'triton'\], got 'gpu'"):
            build()


def test_unusable_backend_refused_at_construction():
    unusable = [(n, why) for n, (ok, why) in lk.available_backends().items() if not ok]
    if not unusable:
        pytest.skip("every backend is usable in this process (needs a machine without CUDA)")
    for name, why in unusable:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
        with pytest.raises(ValueError, match=rf"backend='{name}' cannot run in this process"):
            lk.inject(model, backend=name)
        assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Linear  # untouched
        with pytest.raises(ValueError, match=rf"backend='{name}' cannot run"):
            lk.nn.LieLinear(nn.Linear(4, 3), backend=name)


def test_rank_errors_quote_the_given_value_and_r_alias():
    with pytest.raises(ValueError, match=r"got 0$"):
        lk.nn.LieConv2d(nn.Conv2d(3, 4, 3), rank=0)
    with pytest.raises(ValueError, match=r"got \(2, 0, 1, 1\)$"):
        lk.nn.LieConv2d(nn.Conv2d(3, 4, 3), rank=(2, 0, 1, 1))
    assert lk.nn.LieLinear(nn.Linear(6, 5), r=3).lie_a.shape == (3, 6)
    with pytest.raises(TypeError, match=r"give rank or its alias r, not both"):
        lk.nn.LieLinear(nn.Linear(6, 5), r=3, rank=3)
    model = lk.inject(nn.Sequential(nn.Linear(6, 5)), r=2)
    assert model[0].lie_b.shape == (5, 2)


def test_unadaptable_subclass_is_explained():
    timm = pytest.importorskip("timm")
    conv = timm.layers.Conv2dSame(3, 4, 3, stride=2)  # own forward: pads, then convolves
    model = nn.Sequential(conv, nn.ReLU())
    with pytest.raises(ValueError, match=r"no module of Sequential matches target_modules="
                                         r"None.*'0' \(Conv2dSame, a Conv2d subclass with "
                                         r"its own forward"):
        lk.inject(model)
    with pytest.raises(TypeError, match=r"module '0' is a Conv2dSame, a Conv2d subclass"):
        lk.inject(model, "0")
    with pytest.raises(TypeError, match=r"LieConv2d wraps an nn.Conv2d, got Conv2dSame"):
        lk.nn.LieConv2d(conv)
    with pytest.raises(ValueError, match=r"Adaptable layers in the model: 'conv1' \(Conv2d\)"):
        lk.inject(resnet18(), "no_such_layer")


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
    from lie_kernels.ops import weight as weight_op
    w, a, b = torch.randn(5, 4), torch.randn(2, 4, requires_grad=True), torch.randn(5, 2)
    out = weight_op.lie_gemm(w, b, a, 2, 1.0, "torch")  # the custom op torch.compile sees
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), a, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_scale_beyond_the_compute_dtype_is_refused(dtype):
    """The functional API bounds ``scale`` as the layers do: an fp32 compute dtype cannot
    hold 4e38 (before, the op failed inside torch with an overflow message)."""
    w, b, a = torch.randn(5, 6, dtype=dtype), torch.randn(5, 2, dtype=dtype), \
        torch.randn(2, 6, dtype=dtype)
    with pytest.raises(ValueError, match=r"scale must be at most 3.40282e\+38 in magnitude "
                                         rf"\(the largest finite torch.float32, the compute "
                                         rf"dtype of {dtype} weights\), got 4e\+38"):
        lk.lie_weight_lowrank(w, a, b, scale=4e38)
    core, factors = torch.zeros(2, 2, dtype=dtype), [None, None]
    with pytest.raises(ValueError, match="scale must be at most"):
        lk.lie_weight(torch.randn(2, 2, dtype=dtype), core, factors, scale=-4e38)
    assert lk.lie_weight_lowrank(w.double(), a.double(), b.double(), scale=4e38).dtype == \
        torch.float64
