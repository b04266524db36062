"""The one-node Lie layer (layer_ops): same outputs and gradients as the two-node path
(weight op, then conv/linear) and as float64 autograd, no W-sized tensor saved for backward,
the size switch on both sides, torch.compile without graph breaks, patch_hira on it."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lie_kernels as lk
from lie_kernels.ops import layer as layer_ops, weight as weight_op
from lie_kernels.backends import get_backend
from lie_kernels.reference import lie_weight_lowrank_ref, lie_weight_ref

from helpers import Allocations, lowrank_inputs

# (base layer factory, input shape): strides, dilation, groups, padding modes, unbatched
LAYERS = {
    "linear": (lambda: nn.Linear(13, 11), (2, 3, 13)),
    "conv1d-reflect": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2,
                                         padding_mode="reflect"), (2, 4, 9)),
    "conv2d-stride-groups": (lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2),
                             (2, 6, 7, 6)),
    "conv2d-same-unbatched": (lambda: nn.Conv2d(3, 5, (2, 3), padding="same"), (3, 5, 6)),
    "conv2d-circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
                        (2, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 1), padding=(1, 0, 0), bias=False),
               (2, 2, 3, 4, 2)),
}


@pytest.fixture
def fuse_all(monkeypatch):
    """Every layer, however small, takes the one-node path."""
    monkeypatch.setattr(layer_ops, "FUSE_MIN_NUMEL", 0)


@pytest.fixture(params=["aten", "gemm", "sliced"])
def wgrad_route(request, monkeypatch):
    """The torch backend forms a conv's dL/dW' with ATen, or as GEMMs wherever it can
    (groups 1, 1-D/2-D): the documented switch pushed to either end; "sliced" also
    shrinks the blocks to 40 elements, so those convs run a few output channels at a time."""
    from lie_kernels.backends import torch_backend
    monkeypatch.setattr(torch_backend, "WGRAD_GEMM_POSITIONS",
                        0.0 if request.param == "aten" else float("inf"))
    if request.param == "sliced":
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 40)
    return request.param


def _layer(kind, parametrization, order, train_bias=False, seed=0):
    torch.manual_seed(seed)
    make, xshape = LAYERS[kind]
    base = make()
    layer = lk.nn.LAYER_TYPES[type(base)](base, rank=2, order=order, scale=0.7,
                                          parametrization=parametrization)
    with torch.no_grad():  # off the zero init so the update is not trivially the identity
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.4)
    if train_bias and base.bias is not None:
        base.bias.requires_grad_(True)
    return layer, torch.randn(xshape, requires_grad=True)


def _params(layer):
    return [p for p in layer.parameters() if p.requires_grad]


def _grads(fn, layer, x):
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel()).view(y.shape)  # fixed, non-uniform upstream grad
    return [y, *torch.autograd.grad(y, [x, *_params(layer)], g)]


def _two_node(layer):
    return lambda x: layer._apply_weight(x, layer.adapted_weight())


def _ref64(layer):
    """The layer in float64 with the reference (plain autograd) Lie weight."""
    base = copy.deepcopy(layer.base).double()

    def fn(x):
        w = layer.base.weight.double()
        if layer.parametrization == "lowrank":
            w1 = lie_weight_lowrank_ref(w, layer.lie_a.double(), layer.lie_b.double(),
                                        layer.order, layer.scale)
        else:
            fs = [None if f is None else f.double() for f in layer.factors()]
            w1 = lie_weight_ref(w, layer.lie_core.double(), fs, layer.order, layer.scale)
        bias = None if layer.base.bias is None else layer.base.bias.double()
        if isinstance(base, nn.Linear):
            return F.linear(x.double(), w1, bias)
        return base._conv_forward(x.double(), w1, bias)
    return fn


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("parametrization,order", [("tucker", 1), ("tucker", 4),
                                                   ("lowrank", None), ("lowrank", 2)])
@pytest.mark.parametrize("train_bias", [False, True])
def test_one_node_matches_two_node_and_fp64(fuse_all, wgrad_route, kind, parametrization,
                                            order, train_bias):
    layer, x = _layer(kind, parametrization, order, train_bias)
    got = _grads(layer, layer, x)
    want = _grads(_two_node(layer), layer, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    ref = _grads(_ref64(layer), layer, x)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)


def _saved_weight_sized(fn, layer, x):
    """Saved-for-backward tensors of W's size (any view, e.g. W'ᵀ) other than W itself."""
    w = layer.base.weight
    found = []

    def pack(t):
        if t.numel() == w.numel() and t.data_ptr() != w.data_ptr():
            found.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x).sum().backward()
    return found


def test_one_node_saves_no_weight_sized_tensor(fuse_all):
    layer, x = _layer("conv2d-stride-groups", "tucker", None)
    assert _saved_weight_sized(layer, layer, x) == []
    assert len(_saved_weight_sized(_two_node(layer), layer, x)) >= 1  # the check can fail


@pytest.mark.parametrize("in_features,fused", [(256, True), (255, False)])
def test_size_switch_at_the_documented_constant(in_features, fused):
    assert 256 * 256 == layer_ops.FUSE_MIN_NUMEL
    torch.manual_seed(0)
    layer = lk.nn.LieLinear(nn.Linear(in_features, 256), rank=2, order=4)
    x = torch.randn(3, in_features, requires_grad=True)
    saved = _saved_weight_sized(layer, layer, x)
    assert (saved == []) == fused


def test_linear_goes_through_the_backend_linear_layer_backward_seam(fuse_all, monkeypatch):
    be, calls = get_backend("torch"), []
    real = type(be).linear_layer_backward
    monkeypatch.setattr(type(be), "linear_layer_backward",
                        lambda self, *a: calls.append((a[0].shape, a[7:])) or real(self, *a))
    layer, x = _layer("linear", "lowrank", 1)
    layer.backend = "torch"
    layer(x).sum().backward()
    # grad_y flattened to (N, C_out); dx, no dW, the factors
    assert calls == [(torch.Size([6, 11]), (True, False, True))]


def test_grads_only_where_asked(fuse_all):
    layer, x = _layer("conv2d-stride-groups", "lowrank", 4)
    x.requires_grad_(False)
    layer(x).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _params(layer))


def test_full_weight_grad_when_w_trains(fuse_all):
    layer, x = _layer("conv2d-stride-groups", "tucker", None)
    layer.base.weight.requires_grad_(True)
    got = _grads(layer, layer, x)
    want = _grads(_two_node(layer), layer, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_autocast_and_mixed_dtypes_keep_the_two_node_path(fuse_all):
    layer, x = _layer("linear", "lowrank", 1)
    assert layer_ops.fusable(x, layer.base.weight)
    assert not layer_ops.fusable(x.double(), layer.base.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer_ops.fusable(x, layer.base.weight)
        assert layer(x).dtype == torch.bfloat16  # what F.linear does under autocast


def test_double_backward_is_refused(fuse_all):
    layer, x = _layer("linear", "lowrank", 1)
    y = layer(x).square().sum()
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def test_merge_and_state_dict_unchanged(fuse_all):
    layer, x = _layer("conv2d-stride-groups", "tucker", 2)
    keys = set(layer.state_dict())
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == keys


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(8 * 5 * 5, 6)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_compiled_fullgraph_uses_the_layer_ops(fuse_all):
    torch.manual_seed(0)
    model = lk.inject(_Net(), rank=2, order=None)
    with torch.no_grad():
        for p in _params(model):
            p.normal_(0, 0.2)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # a break raises
    got = _grads(compiled, model, x)
    want = _grads(model, model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert "lie_kernels.lie_conv.default" in seen and "lie_kernels.lie_linear.default" in seen
    torch._dynamo.reset()
    aot = torch.compile(model, fullgraph=True, backend="aot_eager")  # the autograd formula
    for g, w in zip(_grads(aot, model, x), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    w, u, p = torch.randn(6, 2, 3, 3), torch.randn(6, 2), torch.randn(2, 18)
    x, b = torch.randn(2, 4, 5, 5), torch.randn(6)
    torch.library.opcheck(layer_ops.lie_conv, (x, w, b, u, p, 4, 0.5, "torch", [1, 1],
                                               [1, 0], [1, 1], 2))
    wl, pl = torch.randn(6, 7), torch.randn(2, 7)
    torch.library.opcheck(layer_ops.lie_linear, (torch.randn(3, 7), wl, None, u, pl, -1, 0.5,
                                                 "torch"))


@pytest.mark.parametrize("sliced", [False, True])
def test_channels_last_input_gives_channels_last_y_and_dx_and_the_fakes_agree(monkeypatch,
                                                                              sliced):
    """x in channels_last: y and dx come out channels_last, whole or in slices (one-row
    slices included, whose own outputs are both formats at once), with the two-node path's
    values; opcheck finds the custom ops' fakes in agreement (``torch.compile`` plans with
    them)."""
    from lie_kernels.backends import torch_backend
    monkeypatch.setattr(torch_backend, "WGRAD_GEMM_POSITIONS", float("inf"))
    if sliced:  # 36 elements a row: one row a slice
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 40)
    torch.manual_seed(0)
    w, u, p = torch.randn(6, 4, 3, 3), torch.randn(6, 2) * 0.3, torch.randn(2, 36) * 0.3
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(6)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    assert len(layer_ops._slices(x, w, get_backend("torch"), conv)) == (6 if sliced else 1)
    args = (x, w, b, u, p, 1, 0.5, "torch", *conv)
    y = layer_ops.lie_conv(*args)
    gy = torch.randn_like(y)
    bargs = (gy, x.detach(), w, u, p, 1, 0.5, "torch", *conv, [True, False, True, True])
    dx = layer_ops.lie_conv_backward(*bargs)[0]
    for t in (y, dx):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    y2 = F.conv2d(x, get_backend("torch").forward(w, u, p, 1, 0.5), b, padding=1)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, torch.autograd.grad(y2, x, gy)[0], rtol=1e-5, atol=1e-6)
    torch.library.opcheck(layer_ops.lie_conv, args)
    torch.library.opcheck(layer_ops.lie_conv_backward, bargs)


def test_patch_hira_on_the_one_node_path(fuse_all):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from lie_kernels.integrations.peft import patch_hira
    torch.manual_seed(0)
    model = peft.get_peft_model(_Net(), peft.HiraConfig(r=2, target_modules=["fc"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_B" in n:
                p.normal_(0, 0.3)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    want = _grads(model, model, x)
    fc = model.base_model.model.fc
    with patch_hira(model):
        got = _grads(model, model, x)
        w = fc.get_base_layer().weight
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() == w.numel() and t.data_ptr() != w.data_ptr())
                or t, lambda t: t):
            model(x).sum()
        assert not any(saved)
    for g, ww in zip(got, want):
        torch.testing.assert_close(g, ww, rtol=1e-5, atol=1e-5)


TRITON_OK, TRITON_WHY = lk.available_backends().get("triton", (False, "not registered"))


@pytest.mark.skipif(not TRITON_OK, reason=f"triton unusable here: {TRITON_WHY}")
def test_fp16_linear_on_triton_fuses_the_weight_gradient(fuse_all, monkeypatch):
    """A 16-bit LieLinear on Triton takes its weight gradient inside the fused Linear
    backward (dL/dW' = g_yᵀx never formed) and agrees with the two-node path."""
    from lie_kernels.backends import triton_backend
    launches, real = [], triton_backend.kernels.lie_linear_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(triton_backend.kernels, "lie_linear_bwd_kernel", Spy())
    torch.manual_seed(0)
    layer = lk.nn.LieLinear(nn.Linear(40, 24).half(), rank=4, order=2, scale=0.7,
                            backend="triton")
    with torch.no_grad():
        for p in _params(layer):
            p.normal_(0, 0.4)
    x = torch.randn(3, 5, 40).half().requires_grad_()

    def grads(fn):
        y = fn(x)
        return [y, *torch.autograd.grad(y, [x, *_params(layer)],
                                        torch.linspace(-1, 1, y.numel()).view(y.shape).half())]
    got = grads(layer)
    assert len(launches) == 1
    for g, w in zip(got, grads(_two_node(layer))):
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-3, atol=3e-3)


# -- the transient W' on CPU (torch backend: one reused buffer per thread) ---------------
def _wup(rows, cols):
    """``(W, u, p)`` as the backends take them (u = b, p = a)."""
    w, a, b = lowrank_inputs((rows, cols), 3)
    return w, b, a


def test_transient_w_prime_reuses_one_buffer_per_thread(monkeypatch):
    """``forward_transient`` gives ``forward``'s bits in the thread's reused buffer
    (grown for a bigger W, then reused); another thread gets its own; above
    ``TRANSIENT_MAX_BYTES`` every call allocates afresh."""
    from lie_kernels.backends import torch_backend
    be = get_backend("torch")
    big, small = _wup(48, 70), _wup(20, 33)
    for order in (1, 4, None):
        a = be.forward_transient(*big, order, 0.7)
        assert torch.equal(a, be.forward(*big, order, 0.7))
        ptr = a.data_ptr()
        b = be.forward_transient(*small, order, 0.7)
        assert b.data_ptr() == ptr and torch.equal(b, be.forward(*small, order, 0.7))
    torch_backend.release_buffers()
    assert torch_backend._ARENA.slots == {}
    assert torch.equal(be.forward_transient(*big, 1, 0.7), be.forward(*big, 1, 0.7))
    ptr = be.forward_transient(*big, 1, 0.7).data_ptr()
    other = []
    t = __import__("threading").Thread(
        target=lambda: other.append(be.forward_transient(*big, 1, 0.7).data_ptr()))
    t.start(), t.join()
    assert other and other[0] != ptr
    monkeypatch.setattr(torch_backend, "TRANSIENT_MAX_BYTES", 48 * 70 * 4 - 1)
    first = be.forward_transient(*big, 1, 0.7)
    assert first.data_ptr() != ptr and be.forward_transient(*big, 1, 0.7).data_ptr() != ptr


def test_same_shape_layers_share_the_transient_buffer_correctly(fuse_all, wgrad_route,
                                                                monkeypatch):
    """Two one-node layers of one shape in a row build their W' (and, on the GEMM route,
    their dL/dW') in the same buffer, each overwriting the last: outputs and every
    gradient still match the two-node path, whose W' are separate tensors."""
    be, built = get_backend("torch"), []
    real = be.forward_transient
    monkeypatch.setattr(be, "forward_transient",
                        lambda *args: (built.append(real(*args)), built[-1])[1])
    torch.manual_seed(0)
    layers = [_layer("conv2d-circular", "lowrank", 3, seed=s)[0] for s in (1, 2)]
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    params = [p for layer in layers for p in _params(layer)]
    conv2 = nn.Conv2d(4, 3, 1)  # back to 3 channels so the second layer fits

    def run(fn):
        y = fn(layers[1], conv2(fn(layers[0], x)))
        return [y, *torch.autograd.grad(y, [x, *params], torch.linspace(-1, 1, y.numel())
                                        .view(y.shape))]
    got = run(lambda layer, inp: layer(inp))
    slices = 4 if wgrad_route == "sliced" else 1  # 27 elements a row, 40 a block
    assert len(built) == 4 * slices  # fwd + bwd, 2 layers
    assert len({t.data_ptr() for t in built}) == 1
    want = run(lambda layer, inp: _two_node(layer)(inp))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_block_buffers_are_reused_between_calls():
    """After a first call, the torch backend's forward allocates nothing larger than
    a factor but W' and its backward nothing larger than a factor: the row-block
    buffers come from the thread's arena."""
    be = get_backend("torch")
    w, u, p = _wup(40, 50)
    g = torch.randn_like(w)
    for order in (2, None):
        be.forward(w, u, p, order, 0.7), be.backward(g, w, u, p, order, 0.7, False)
        with Allocations() as fwd:
            be.forward(w, u, p, order, 0.7)
        with Allocations() as bwd:
            be.backward(g, w, u, p, order, 0.7, False)
        factor = max(u.numel(), p.numel())  # du, dp and scalars may be allocated
        assert [t.numel() for t in fwd.tensors if t.numel() > factor] == [w.numel()]
        assert [t.numel() for t in bwd.tensors if t.numel() > factor] == []


@pytest.mark.parametrize("order,slots", [(1, ["out"]), (None, ["out", "x"]),
                                         (3, ["h", "out", "x"])])
@pytest.mark.parametrize("kind", ["linear", "conv2d-gemm", "conv2d-aten"])
def test_a_layer_step_uses_only_the_buffers_its_order_needs(fuse_all, monkeypatch, order,
                                                            slots, kind):
    """fp32 W: forward forms x = u@p in W's own rows (no x buffer); an order-1 layer's
    backward forms t = g ⊙ W in the dL/dW' it made, on either dL/dW' route (no block
    buffer), and the exact exp forms t in x's buffer. Gradients match the op path, where
    the caller's g is read only."""
    from lie_kernels.backends import torch_backend
    monkeypatch.setattr(torch_backend, "WGRAD_GEMM_POSITIONS",
                        0.0 if kind.endswith("aten") else float("inf"))
    torch.manual_seed(2)
    base = nn.Linear(30, 20) if kind == "linear" else nn.Conv2d(5, 20, 3)
    layer = lk.nn.LAYER_TYPES[type(base)](base, rank=3, order=order, scale=0.7,
                                          parametrization="lowrank")
    with torch.no_grad():
        for q in _params(layer):
            q.normal_(0, 0.3)
    x = torch.randn(4, 30) if kind == "linear" else torch.randn(2, 5, 4, 4)
    seen = {}

    def step():
        torch_backend.release_buffers()
        got = _grads(layer, layer, x.requires_grad_(True))
        seen["slots"] = sorted(torch_backend._ARENA.slots)
        seen["got"] = got
    _in_fresh_thread(step)
    assert seen["slots"] == slots
    for g, w in zip(seen["got"], _grads(_two_node(layer), layer, x)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_backward_overwrites_only_a_grad_it_is_given_as_scratch():
    """The public ``backward`` leaves the caller's g intact; ``overwrite_grad=True``
    (what the layer seams pass for the dL/dW' they formed) gives the same gradients."""
    be = get_backend("torch")
    w, u, p = _wup(40, 50)
    g = torch.randn_like(w)
    keep = g.clone()
    want = be.backward(g, w, u, p, 1, 0.7, False)
    assert torch.equal(g, keep)
    got = be.backward(g.clone(), w, u, p, 1, 0.7, False, True)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_arena_made_under_inference_mode_holds_normal_tensors():
    """A first call under inference_mode must not leave an inference tensor behind
    (views of it would be inference tensors too, which autograd cannot save); a later
    training step through the same thread's buffers still trains."""
    import threading
    from lie_kernels.backends import torch_backend
    result = []

    def fresh_thread():  # a thread of its own: its arena starts empty
        layer, x = _layer("linear", "lowrank", 4)
        with torch.inference_mode():
            layer(x)
        slots = torch_backend._ARENA.slots
        result.append(sorted(slots) == ["h", "out"]  # fp32 W: x formed in the output rows
                      and not any(b.is_inference() for b in slots.values()))
        layer(x).sum().backward()
        result.append(all(p.grad is not None for p in _params(layer)))
    layer_ops.FUSE_MIN_NUMEL, old = 0, layer_ops.FUSE_MIN_NUMEL
    try:
        t = threading.Thread(target=fresh_thread)
        t.start(), t.join()
    finally:
        layer_ops.FUSE_MIN_NUMEL = old
    assert result == [True, True]


def _in_fresh_thread(fn):
    """``fn()`` on a thread of its own (its arena starts empty); re-raises its error."""
    import threading
    err = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test's thread
            err.append(e)
    t = threading.Thread(target=run)
    t.start(), t.join()
    if err:
        raise err[0]


def test_arena_keeps_no_fake_tensor_from_a_dispatch_mode():
    """A layer run once under FakeTensorMode (shape and FLOP estimators do this) must not
    leave fake buffers behind: the next real calls on that thread (one-node exact, and
    order 2 through the block buffers) give the same W' and output as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from lie_kernels.backends import torch_backend
    torch.manual_seed(0)
    layers = [lk.nn.LieLinear(nn.Linear(256, 256), rank=2, order=k) for k in (None, 2)]
    for layer in layers:
        with torch.no_grad():
            layer.lie_a.normal_(0, 0.3), layer.lie_b.normal_(0, 0.3)
    x = torch.randn(3, 256)
    want = [layer(x).detach() for layer in layers]

    def fresh_thread():
        for layer in layers:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                try:
                    layer(mode.from_tensor(x))
                except Exception:  # noqa: BLE001 -- order 2's eager NaN check is data-dependent
                    pass
        assert all(type(b) is torch.Tensor for b in torch_backend._ARENA.slots.values())
        for layer, w in zip(layers, want):
            torch.testing.assert_close(layer(x), w, rtol=0, atol=0)
    _in_fresh_thread(fresh_thread)


def test_jit_trace_of_a_one_node_layer():
    """``torch.jit.trace`` records the layer (no reused buffer baked into its graph as a
    constant, no ``view(dtype)`` the tracer rejects) and the trace computes the layer."""
    torch.manual_seed(0)
    layer = lk.nn.LieLinear(nn.Linear(256, 256), rank=2, order=1)
    with torch.no_grad():
        layer.lie_a.normal_(0, 0.3), layer.lie_b.normal_(0, 0.3)
    x = torch.randn(3, 256)

    def fresh_thread():
        traced = torch.jit.trace(layer, x, check_trace=False)
        torch.testing.assert_close(traced(x + 1), layer(x + 1), rtol=0, atol=0)
    _in_fresh_thread(fresh_thread)


def test_arena_stays_on_the_cpu_under_another_default_device():
    """``torch.set_default_device`` must not move the CPU buffers: under a "meta"
    default a CPU weight still gets its W' (and block buffers) on the CPU, with
    ``forward``'s values."""
    import threading
    be, w = get_backend("torch"), _wup(24, 30)
    want = {k: be.forward(*w, k, 0.7) for k in (3, None)}
    got = {}

    def fresh_thread():  # empty arena: the buffers are allocated under the default
        with torch.device("meta"):
            for k in want:
                got[k] = be.forward_transient(*w, k, 0.7).clone()
    t = threading.Thread(target=fresh_thread)
    t.start(), t.join()
    for k in want:
        assert got[k].device.type == "cpu" and torch.equal(got[k], want[k])


def _spy_backward(monkeypatch):
    """The dL/dW' each call of the torch backend's ``backward`` receives."""
    be, seen = get_backend("torch"), []
    real = type(be).backward
    monkeypatch.setattr(type(be), "backward", lambda self, g, *a: seen.append(g) or
                        real(self, g, *a))
    return be, seen


def _in_transient_buffer(t):
    from lie_kernels.backends import torch_backend
    buf = torch_backend._ARENA.slots.get("out")
    return buf is not None and t.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nd,batch,taken", [(2, 2, True), (2, 3, False), (1, 2, True),
                                            (1, 3, False)])
def test_conv_weight_gradient_gemm_at_the_documented_switch(monkeypatch, dtype, nd, batch,
                                                            taken):
    """C_out = 32 and 4 output positions per sample: batch 2 gives N·L = 8 =
    ``WGRAD_GEMM_POSITIONS``·C_out (the GEMM into the transient buffer), batch 3 gives 12
    (ATen). Either way du, dp, dW match the base class's ATen route and float64; strided
    (non-contiguous) x, stride, dilation and padding included."""
    from lie_kernels.backends import Backend, torch_backend
    assert torch_backend.WGRAD_GEMM_POSITIONS == 0.25
    be, seen = _spy_backward(monkeypatch)
    torch.manual_seed(3)
    k = (3,) * nd
    w = torch.randn(32, 5, *k, dtype=dtype)
    u, p = torch.randn(32, 3, dtype=dtype), torch.randn(3, w[0].numel(), dtype=dtype)
    # stride 2, dilation 2, padding 1: a 5x5 input gives 2x2 outputs, a 1-D 9 gives 4
    size = (5, 5) if nd == 2 else (9,)
    x = torch.randn(batch, 2 * 5, *size, dtype=dtype)[:, ::2]  # non-contiguous
    conv = ([2] * nd, [1] * nd, [2] * nd, 1)
    y = torch.ops.aten.convolution(x, w, None, *conv[:3], False, [0] * nd, 1)
    assert y[0, 0].numel() == 4
    gy = torch.randn_like(y)
    got = be.conv_backward(gy, x, w, u, p, 2, 0.7, True, conv)
    assert len(seen) == 1 and _in_transient_buffer(seen[0]) == taken
    want = Backend.conv_backward(be, gy, x, w, u, p, 2, 0.7, True, conv)
    ref = Backend.conv_backward(be, gy.double(), x.double(), w.double(), u.double(),
                                p.double(), 2, 0.7, True, conv)
    for g, wn, r in zip(got, want, ref):
        torch.testing.assert_close(g, wn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_slices_at_the_documented_sizes():
    """A CPU conv on the GEMM route runs ``CHUNK_ELEMS`` elements of W' at a time:
    ResNet-18's 512x512x3x3 on 3x3 px at batch 8 in slices of 113 rows (of 4608
    elements, 2 MiB in fp32); on 6x6 px (N·L = 288 > C_out/4) in one piece, as are
    other devices' dtypes, groups > 1 and 3-D convs."""
    from lie_kernels.backends import torch_backend
    assert torch_backend.CHUNK_ELEMS == 1 << 19
    be = get_backend("torch")
    w = torch.empty(512, 512, 3, 3)
    same = ([1, 1], [1, 1], [1, 1], 1)
    assert be.conv_slice_rows(torch.empty(8, 512, 3, 3), w, same) == 113
    assert be.conv_slice_rows(torch.empty(8, 512, 6, 6), w, same) == 512
    assert be.conv_slice_rows(torch.empty(8, 512, 3, 3, dtype=torch.float16),
                              w.half(), same) == 512
    assert be.conv_slice_rows(torch.empty(8, 512, 3, 3), w[:, :256],
                              ([1, 1], [1, 1], [1, 1], 2)) == 512
    assert be.conv_slice_rows(torch.empty(1, 64, 2, 2, 2), torch.empty(512, 64, 3, 3, 3),
                              ([1] * 3, [1] * 3, [1] * 3, 1)) == 512


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("order", [1, 3, None])
@pytest.mark.parametrize("train_w", [False, True])
def test_conv_layer_in_slices_matches_one_piece_and_fp64(fuse_all, monkeypatch, nd, order,
                                                          train_w):
    """With blocks of 20 rows (C_out = 130 on 3x3 px: 7 balanced slices of 18-19 rows),
    the layer builds W' and dL/dW' one slice at a time in the reused buffer, which never
    holds more than a slice; y, dx and every gradient (W's too when it trains, bias)
    match the layer run in one piece and the float64 reference. Non-contiguous x."""
    from lie_kernels.backends import torch_backend
    be = get_backend("torch")
    row = 12 * 3 ** nd
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 20 * row)
    torch.manual_seed(5)
    base = (nn.Conv1d if nd == 1 else nn.Conv2d)(12, 130, 3, stride=2, padding=1)
    layer = lk.nn.LAYER_TYPES[type(base)](base, rank=3, order=order, scale=0.7,
                                          parametrization="lowrank")
    with torch.no_grad():
        for q in _params(layer):
            q.normal_(0, 0.3)
    base.weight.requires_grad_(train_w)
    base.bias.requires_grad_(True)
    size = (5,) * nd  # 3 outputs a dim: N·L = 2·3^nd <= 130/4
    x = torch.randn(2, 24, *size, dtype=torch.float32)[:, ::2].requires_grad_(True)
    built, real = [], be.forward_transient
    monkeypatch.setattr(be, "forward_transient",
                        lambda *a: (built.append(a[0].shape[0]), real(*a))[1])
    torch_backend.release_buffers()
    got = _grads(layer, layer, x)
    assert built == [18, 19, 18, 19, 18, 19, 19] * 2  # forward, then for dx
    assert torch_backend._ARENA.slots["out"].numel() <= 19 * row * 4  # bytes: one slice
    monkeypatch.setattr(type(be), "conv_slice_rows", lambda self, x, w, conv: w.shape[0])
    want = _grads(layer, layer, x)
    assert built[14:] == [130, 130]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, _grads(_ref64(layer), layer, x)):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2, 4, None])
@pytest.mark.parametrize("block_rows", [37, 13])
def test_linear_backward_builds_w_prime_where_dl_dw_prime_was(monkeypatch, order, block_rows):
    """The torch backend's Linear backward forms dL/dW' in the reused buffer, writes each
    block's W' over the rows of it that the Lie backward has used, and takes dx = grad_y W'
    from there: W is read once and ``forward_transient`` never runs. dx, du and dp match
    the default (W' rebuilt for dx, then dL/dW') and float64 (odd shapes, one block or
    three, a non-contiguous x)."""
    from lie_kernels.backends import Backend, torch_backend
    be = get_backend("torch")
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", block_rows * 61)
    w, u, p = _wup(37, 61)
    gy, x = torch.randn(9, 37), torch.randn(61, 9).t()
    want = Backend.linear_layer_backward(be, gy, x, w, u, p, order, 0.7, True, False, True)
    monkeypatch.setattr(type(be), "forward_transient", None)  # not called
    seen, real = [], type(be)._backward
    monkeypatch.setattr(type(be), "_backward", lambda self, g, *a, **k: seen.append(
        (_in_transient_buffer(g), k)) or real(self, g, *a, **k))
    dx, dw, du, dp = be.linear_layer_backward(gy, x, w, u, p, order, 0.7, True, False, True)
    assert dw is None and seen == [(True, {"rebuild": True})]
    for g, wn in zip((dx, du, dp), (want[0], *want[2:])):
        torch.testing.assert_close(g, wn, rtol=1e-5, atol=1e-6)
    w64, u64, p64, x64 = (t.double().requires_grad_() for t in (w, u, p, x))
    y = x64 @ lie_weight_lowrank_ref(w64, p64, u64, order=order, scale=0.7).t()
    refs = torch.autograd.grad(y, (x64, u64, p64), gy.double())
    for g, r in zip((dx, du, dp), refs):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-6


def test_linear_weight_gradient_in_the_transient_buffer(monkeypatch):
    """On CPU, dL/dW' = grad_yᵀ x of a Linear layer is written into the reused buffer
    (no fresh W-sized tensor), and the gradients are the base class's."""
    from lie_kernels.backends import Backend
    be, seen = _spy_backward(monkeypatch)
    w, u, p = _wup(40, 50)
    gy, x = torch.randn(7, 40), torch.randn(7, 50)
    got = be.linear_backward(gy, x, w, u, p, None, 0.7, True)
    assert len(seen) == 1 and _in_transient_buffer(seen[0])
    want = Backend.linear_backward(be, gy, x, w, u, p, None, 0.7, True)
    for g, wn in zip(got, want):
        torch.testing.assert_close(g, wn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base,xshape", [(lambda: nn.Conv2d(4, 16, 3, padding=1), (0, 4, 3, 3)),
                                         (lambda: nn.Conv1d(4, 16, 3), (0, 4, 5)),
                                         (lambda: nn.Linear(6, 5), (0, 6))])
def test_empty_batch_gives_zero_gradients(fuse_all, base, xshape):
    """A batch of 0 samples (the conv's dL/dW' takes the GEMM route: 0 positions) gives
    an empty output and zero factor gradients, as the two-node path does."""
    torch.manual_seed(0)
    b = base()
    layer = lk.nn.LAYER_TYPES[type(b)](b, rank=2, order=1)
    with torch.no_grad():
        for q in _params(layer):
            q.normal_(0, 0.3)
    x = torch.randn(xshape, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape[0] == 0
    assert all(q.grad is not None and not q.grad.any() for q in _params(layer))


@pytest.mark.parametrize("make,xshape", [(lambda: nn.Linear(512, 256), (4, 512)),
                                         (lambda: nn.Conv2d(64, 128, 3, padding=1),
                                          (2, 64, 6, 6))])
def test_backward_inside_autocast_keeps_fp32_factor_gradients(make, xshape):
    """``backward()`` called inside an autocast region (forward outside) gives a one-node
    layer the same low-rank factor gradients as outside it: the Lie math and its
    dL/dW' stay fp32 (autocast would run their GEMMs in bf16, ~3e-3 relative error).
    A two-node layer's dL/dW' is PyTorch's conv/linear backward, which autocast does
    cast (as for any nn.Linear); the weight op's own math is checked below."""
    torch.manual_seed(0)
    base = make()
    layer = lk.nn.LAYER_TYPES[type(base)](base, rank=4, order=2, parametrization="lowrank")
    with torch.no_grad():
        for q in _params(layer):
            q.normal_(0, 0.2)
    x = torch.randn(xshape)
    grads = []
    for autocast in (False, True):
        layer.zero_grad()
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y.square().sum().backward()
        grads.append([q.grad.clone() for q in _params(layer)])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_traces_get_fresh_buffers_even_when_the_thread_has_some():
    """With the thread's buffers already made by a real call: a strict FakeTensorMode
    (every tensor fake) still runs the layer, and ``make_fx`` records no reused buffer
    as a graph constant (only the layer's parameters)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from lie_kernels.backends import torch_backend
    torch.manual_seed(0)
    layer = lk.nn.LieLinear(nn.Linear(256, 256), rank=2, order=None)
    with torch.no_grad():
        layer.lie_a.normal_(0, 0.3), layer.lie_b.normal_(0, 0.3)
    x = torch.randn(3, 256)

    def fresh_thread():
        layer(x)  # the thread's buffers now exist
        mode = FakeTensorMode()
        params = {n: mode.from_tensor(t) for n, t in [*layer.named_parameters(),
                                                      *layer.named_buffers()]}
        fx = mode.from_tensor(x)
        with mode:
            y = torch.func.functional_call(layer, params, (fx,))
        assert y.shape == (3, 256)
        gm = make_fx(lambda inp: layer(inp))(x)
        buffers = {b.data_ptr() for b in torch_backend._ARENA.slots.values()}
        consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        assert consts and not any(c.data_ptr() in buffers for c in consts)
        torch.testing.assert_close(gm(x + 1), layer(x + 1), rtol=0, atol=0)
    _in_fresh_thread(fresh_thread)


@pytest.mark.parametrize("order", [2, None])
def test_weight_op_backward_inside_autocast_stays_fp32(order):
    """The weight op's backward (saved W or, for a small exact W, saved W') under an
    autocast region gives the same du, dp as outside it."""
    w, u, p = _wup(40, 50)
    u.requires_grad_(True), p.requires_grad_(True)
    g = torch.randn_like(w)
    grads = []
    for autocast in (False, True):
        out = weight_op.apply(w, u, p, order, 0.7, "torch")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            grads.append(torch.autograd.grad(out, [u, p], g))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("c_in, c_out, px", [(258, 777, 3), (300, 400, 2), (130, 520, 3)])
def test_fresh_conv_layer_and_the_wrapped_layer(c_in, c_out, px):
    """At init W' is W bitwise, so a fresh layer computes what the wrapped layer computes:
    bitwise where the conv runs whole; on the CPU slices (a big groups-1 W on small maps)
    each slice convolves W's own rows bitwise, and the whole differs from one conv only by
    the conv's summation order (ATen picks it by channel count): within fp32 rounding, as
    docs/numerics.md states."""
    torch.manual_seed(c_out)
    base = nn.Conv2d(c_in, c_out, 3, padding=1)
    layer = lk.nn.LieConv2d(copy.deepcopy(base), rank=4)
    x = torch.randn(2, c_in, px, px)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    slices = layer_ops._slices(x, base.weight, get_backend("torch"), geometry)
    assert len(slices) > 1  # these shapes take the sliced route
    with torch.no_grad():
        got, want = layer(x), base(x)
        for r0, n in slices:  # each slice: W's rows, bitwise
            part = F.conv2d(x, base.weight[r0:r0 + n], base.bias[r0:r0 + n], padding=1)
            assert torch.equal(got[:, r0:r0 + n], part)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        big = torch.randn(2, c_in, 16, 16)  # N·L > C_out/4: one conv, bitwise the base's
        assert len(layer_ops._slices(big, base.weight, get_backend("torch"), geometry)) == 1
        assert torch.equal(layer(big), base(big))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "numerics.md").read_text()
    identity = doc[doc.index("## inf and NaN"):]
    assert "slice" in identity[:identity.index("```")]  # the promise names its exception
