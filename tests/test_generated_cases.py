"""Hypothesis fuzzing of the fused op against an independent float64 reference.

Drawn: weight rank 2-5 with odd sizes, Tucker (ranks, None factors) or low-rank
(rank 1-5), contiguous / transposed / stepped / stride-0 views of W and of the
factors, orders 0-8 and exact, scales including 0, negative and ±50, all four
dtypes, W with or without a gradient. The factors are scaled so that
``|scale·Δ| <= X`` with X drawn up to a dtype-dependent cap: exp stays finite.

The error bound is elementwise and dtype-aware. The same reference run on the
absolute values of every input (``|s|``, ``|g|``) bounds the sum of |terms| behind
each output entry (every term of the true computation is bounded by its abs
counterpart, ``|exp_K(x)| <= exp_K(|x|)``), so

    |got - ref| <= (c·eps_compute·(N + X) + c·eps_dtype·(1 + X)) · absref + |ref|·eps_dtype + atol

with N the longest contraction: a floating-point sum of N terms errs by at most
about N·eps of the sum of their magnitudes, an exp of an argument known to
eps·X errs by eps·X relative, and a 16-bit store rounds by eps_dtype. A true value beyond the
dtype's range (16-bit gradients with scale ±50 get there) must come out as ±inf or ±max.

Profiles (tests/conftest.py): "ci" by default (bounded example counts, a few
seconds), ``pytest --slow`` for a deep run (thousands of examples).
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lie_kernels as lk
from lie_kernels.reference import lie_weight_lowrank_ref, lie_weight_ref, tucker_einsum

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
#: cap on |scale·Δ|: W' = W·exp(x) must stay finite (|W| <= ~4 here)
X_CAP = {torch.float64: 20.0, torch.float32: 20.0, torch.float16: 8.0, torch.bfloat16: 20.0}
SCALES = [0.0, 1.0, -1.0, 50.0, -50.0, 0.37, -2.5]
VIEWS = ["contiguous", "transposed", "stepped", "stride0"]
MAX_NUMEL = 360


@st.composite
def cases(draw, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(2, 5))
    shape = []
    for _ in range(ndim):
        room = MAX_NUMEL // max(1, math.prod(shape))
        shape.append(draw(st.integers(1, max(1, min(9, room)))))
    lowrank = draw(st.booleans())
    if lowrank:
        ranks = draw(st.integers(1, 5))
        none_modes = ()
    else:
        none_modes = tuple(n for n in range(ndim) if draw(st.booleans()) and shape[n] <= 5)
        ranks = tuple(shape[n] if n in none_modes else draw(st.integers(1, shape[n] + 1))
                      for n in range(ndim))
    return dict(
        dtype=dtype, shape=tuple(shape), lowrank=lowrank, ranks=ranks, none_modes=none_modes,
        order=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, None])),
        scale=draw(st.sampled_from(SCALES)),
        xmax=draw(st.floats(0.0, X_CAP[dtype])),
        w_view=draw(st.sampled_from(VIEWS)),
        f_views=[draw(st.sampled_from(VIEWS)) for _ in range(ndim + 1)],
        w_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _view(leaf, kind):
    """A differentiable view of ``leaf`` with the given memory layout (same values, except
    stride0, whose values repeat along dim 0 by construction)."""
    if kind == "transposed":  # column-major: strides (1, d0, ...)
        return leaf.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "stepped":
        wide = torch.stack([leaf, torch.zeros_like(leaf)], dim=-1)  # values at stride 2
        return wide[..., 0]
    if kind == "stride0":
        return leaf[:1].expand(leaf.shape)
    return leaf


def _build(c, device):
    """Leaf tensors for one drawn case: W and [core, U_1..U_N] or [a, b]."""
    gen = torch.Generator().manual_seed(c["seed"])
    dt, shape = c["dtype"], c["shape"]

    def leaf(size, requires_grad=True):
        t = torch.randn(size, dtype=torch.float64, generator=gen).to(dtype=dt, device=device)
        return t.requires_grad_(requires_grad)

    w_leaf = leaf(shape, c["w_grad"])
    if c["lowrank"]:
        leaves = [leaf((c["ranks"], math.prod(shape[1:]))), leaf((shape[0], c["ranks"]))]
    else:
        leaves = [leaf(c["ranks"])] + [None if n in c["none_modes"] else leaf((d, r))
                                       for n, (d, r) in enumerate(zip(shape, c["ranks"]))]
    return w_leaf, leaves


def _delta_max(c, leaves, views) -> float:
    """max |Δ| in float64 for the factors as the op will see them."""
    fs = [None if f is None else _view(f, v).detach().double() for f, v in zip(leaves, views)]
    delta = fs[1] @ fs[0] if c["lowrank"] else tucker_einsum(fs[0], fs[1:])
    return delta.abs().max().item()


def _check(c, backend, device="cpu", rounds_operands=False):
    dt = c["dtype"]
    w_leaf, leaves = _build(c, device)
    views = c["f_views"][:len(leaves)]
    # scale the first factor so that max |scale·Δ| = xmax (or Δ = 0 when scale is 0)
    dmax = _delta_max(c, leaves, views)
    if c["scale"] != 0.0 and dmax > 0:
        with torch.no_grad():
            leaves[0].mul_(c["xmax"] / (abs(c["scale"]) * dmax))
    x_bound = c["xmax"] if c["scale"] != 0.0 else 0.0

    w = _view(w_leaf, c["w_view"])
    fs = [None if f is None else _view(f, v) for f, v in zip(leaves, views)]
    for t in [w, *fs]:
        if t is not None and t.requires_grad:
            t.retain_grad()
    kw = dict(order=c["order"], scale=c["scale"], backend=backend)
    if c["lowrank"]:
        out = lk.lie_weight_lowrank(w, fs[0], fs[1], **kw)
    else:
        out = lk.lie_weight(w, fs[0], fs[1:], **kw)
    assert out.dtype == dt and out.shape == w.shape
    g = torch.randn(w.shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(c["seed"] + 1)
                    ).to(dtype=dt, device=device)
    out.backward(g)
    inputs = [t for t in [w, *fs] if t is not None and t.requires_grad]
    got = [out] + [t.grad for t in inputs]

    def reference(absolute):
        f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        args = [None if t is None else f(t).requires_grad_(t.requires_grad) for t in [w, *fs]]
        s = abs(c["scale"]) if absolute else c["scale"]
        if c["lowrank"]:
            y = lie_weight_lowrank_ref(args[0], args[1], args[2], c["order"], s)
        else:
            y = lie_weight_ref(args[0], args[1], args[2:], c["order"], s)
        diff = [a for a, t in zip(args, [w, *fs]) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, diff, f(g))
        return [y, *grads]

    want, bound = reference(False), reference(True)
    eps_c = torch.finfo(torch.float64 if dt == torch.float64 else torch.float32).eps
    eps_d = torch.finfo(dt).eps
    # longest contraction: the forward sums over the ranks (+ Horner steps); a gradient
    # may sum over every entry of W and the factors
    ranks = c["ranks"] if isinstance(c["ranks"], int) else sum(c["ranks"])
    n_fwd = ranks + (c["order"] or 8) + 2
    n_bwd = w.numel() + sum(0 if f is None else f.numel() for f in fs)
    # a kernel that rounds 16-bit operands (Triton's 16-bit tensor-core dots) errs by
    # eps_dtype per term; the torch backend rounds only its 16-bit results
    operands = 4 * eps_d * (1 + x_bound) if rounds_operands and eps_d > eps_c else 0.0
    atol = torch.finfo(dt).tiny * 4
    top = torch.finfo(dt).max
    for i, (a, r, b) in enumerate(zip(got, want, bound)):
        a = a.detach().double()
        err = (a - r).abs()
        rel = 4 * eps_c * ((n_fwd if i == 0 else n_bwd) + x_bound) + operands
        allowed = rel * b + eps_d * r.abs() + atol
        # a true value that may lie beyond the dtype's range may come out as ±inf/±max
        overflow = (r.abs() + allowed >= top) & (a.abs() >= top) & (a.sign() == r.sign())
        err = torch.where(overflow, torch.zeros_like(err), err)
        worst = (err - allowed).argmax()
        assert bool((err <= allowed).all()), (
            f"output {i} ({'forward' if i == 0 else 'gradient'}): error "
            f"{err.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g} "
            f"(ref {r.flatten()[worst].item():.6g}) for {c}")


@settings(max_examples=10 * settings.default.max_examples)
@given(cases())
def test_fuzz_torch_backend(case):
    _check(case, "torch")


def _triton_usable():
    usable, why = lk.available_backends()["triton"]
    return usable, why


@pytest.mark.skipif(not _triton_usable()[0], reason=f"triton unusable here: {_triton_usable()[1]}")
@settings(max_examples=max(6, settings.default.max_examples // 4))
@given(cases(dtypes=[torch.float32, torch.float16, torch.bfloat16]))
def test_fuzz_triton_backend(case):
    # ~4 ms per program in the interpreter: few examples, small shapes (see MAX_NUMEL);
    # on a GPU machine the same cases run the compiled kernels on CUDA tensors
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(case, "triton", device, rounds_operands=True)
