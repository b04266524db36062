"""Random inputs, the float64 reference, small probes and small models used across the tests."""
import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lie_kernels as lk
from lie_kernels.reference import lie_weight_lowrank_ref, lie_weight_ref

# (weight shape, tucker ranks, modes whose factor is None = identity)
SHAPES = [
    ((7, 13), (3, 5), ()),
    ((5, 3, 4), (2, 3, 1), (1,)),
    ((6, 5, 3, 3), (3, 2, 3, 3), (2, 3)),
    ((4, 3, 2, 3, 2), (1, 2, 2, 2, 1), (2,)),
]
ORDERS = [0, 1, 2, 3, 4, 8, None]


def rand(*shape, dtype=torch.float32, device="cpu", noncontig=False, scale=1.0):
    """Random tensor; ``noncontig`` gives a transposed-then-sliced view of the same shape."""
    if not noncontig:
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    big = torch.randn(*reversed(shape[:2]), *shape[2:], 2, dtype=torch.float64) * scale
    t = big[..., 0].transpose(0, 1)  # transposed leading dims and a stride-2 last dim
    assert not t.is_contiguous() and tuple(t.shape) == tuple(shape)
    return t.to(dtype=dtype, device=device)


def tucker_inputs(shape, ranks, none_modes, dtype=torch.float32, device="cpu",
                  noncontig=False):
    w = rand(*shape, dtype=dtype, device=device, noncontig=noncontig)
    core = rand(*ranks, dtype=dtype, device=device, scale=0.5)
    factors = [None if n in none_modes else
               rand(d, r, dtype=dtype, device=device, noncontig=noncontig and n % 2 == 0,
                    scale=0.7)
               for n, (d, r) in enumerate(zip(shape, ranks))]
    return w, core, factors


def lowrank_inputs(shape, rank, dtype=torch.float32, device="cpu", noncontig=False):
    w = rand(*shape, dtype=dtype, device=device, noncontig=noncontig)
    cols = 1
    for d in shape[1:]:
        cols *= d
    a = rand(rank, cols, dtype=dtype, device=device, noncontig=noncontig, scale=0.5)
    b = rand(shape[0], rank, dtype=dtype, device=device, scale=0.5)
    return w, a, b


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64).requires_grad_(True)


def ref_tucker(w, core, factors, order, scale):
    """Float64 reference on CPU, with its inputs (for gradients)."""
    args = [f64(w), f64(core), [f64(f) for f in factors]]
    return lie_weight_ref(args[0], args[1], args[2], order, scale), args


def ref_lowrank(w, a, b, order, scale):
    args = [f64(w), f64(a), f64(b)]
    return lie_weight_lowrank_ref(*args, order, scale), args


def rel_err(x, ref):
    x = x.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(model, x):
    """``[model(x), *d(Σ model(x)²)/d(trainable params)]``: what two paths must agree on."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    return [out, *torch.autograd.grad(out.square().sum(), params)]


class Allocations(TorchDispatchMode):
    """Every tensor allocated by an ``empty``/``zeros`` factory call while active (what
    the backends allocate; outputs of other ops, e.g. ``mm``, are not seen)."""
    FACTORIES = ("aten::empty", "aten::zeros", "aten::empty_strided", "aten::empty_like")

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.FACTORIES:
            self.tensors.append(out)
        return out


# -- small models and layers shared by the model, merge, error and PEFT tests --
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


def three_layer_model(order=2):
    torch.manual_seed(0)
    model = lk.inject(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                                    nn.Linear(6, 3)), rank=2, order=order)
    for _, m in lk.nn.lie_layers(model):
        randomised(m)
    return model


def resnet18():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def tiny_llama():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)
