"""Random inputs, the float64 reference and small probes used across the tests."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    """Random tensor; ``noncontig`` gives a transposed-then-sliced view with the same values' shape."""
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
