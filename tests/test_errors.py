"""Bad input gets a clear error that names the argument, expected and given."""
import pytest
import torch
from torch import nn

import lie_kernels as lk


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
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
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
