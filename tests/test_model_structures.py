"""inject, merge and unload on real model structures: tied weights, aliased modules, the
transformer fast paths, threads sharing one model, and inject's all-or-nothing checks."""
import copy
import sys
import threading
import time

import pytest
import torch
from torch import nn

import lie_kernels as lk


def randomise(model, std=0.3):
    """Move every Lie factor off its zero init, so that W' != W."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("lie_"):
                p.copy_(torch.randn_like(p) * std)
    return model


def snapshot(model):
    """Everything a rejected call must leave alone: modules (every path), parameters with
    their requires_grad, the state_dict's values, hooks."""
    modules = list(model.named_modules(remove_duplicate=False))
    return ([(n, id(m), type(m)) for n, m in modules],
            [(n, id(p), p.requires_grad)
             for n, p in model.named_parameters(remove_duplicate=False)],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in modules])


def assert_untouched(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert after[2].keys() == before[2].keys()
    for k, v in before[2].items():
        assert torch.equal(after[2][k], v), k


def assert_folds_refused(model, match):
    """``lk.merge`` and ``lk.unload`` both raise ``match`` and leave ``model`` untouched."""
    before = snapshot(model)
    for fold in (lk.merge, lk.unload):
        with pytest.raises(RuntimeError, match=match):
            fold(model)
        assert_untouched(model, before)


# -- tied weights ------------------------------------------------------------------
class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 6), nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_unload_refuses_two_updates_in_one_tied_weight():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'enc' and 'dec' share one weight Parameter"):
        model = lk.inject(EncDec(), rank=2, order=2)
    randomise(model)
    assert_folds_refused(model, r"Lie layers 'enc' and 'dec' share one weight Parameter "
                                r"\(tied weights\).*no layer was")


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_weight_tied_to_a_plain_module_is_never_folded():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'head' and 'emb' \(Embedding\) share one weight"):
        model = lk.inject(TiedHead(), "head", rank=2, order=2)
    randomise(model)
    ids = torch.tensor([[1, 4, 7]])
    want = model(ids)  # the embedding reads W, the head W'
    assert_folds_refused(model, r"'head' and 'emb' \(Embedding\) share one weight "
                                r"Parameter.*would change 'emb' too")
    assert torch.equal(model(ids), want)


# -- one module under two names ----------------------------------------------------
class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(6, 6)
        self.a, self.b, self.head = shared, shared, nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("targets", [None, "a", "b", [nn.Linear]])
def test_aliased_module_gets_one_lie_layer_at_every_name(targets):
    torch.manual_seed(0)
    plain = Aliased()
    model = lk.inject(copy.deepcopy(plain), targets, rank=2, order=2)
    assert isinstance(model.a, lk.nn.LieLinear) and model.b is model.a
    randomise(model)
    x = torch.randn(4, 6)
    want = model(x)
    want.sum().backward()  # both call sites train the one update
    merged = lk.merge(copy.deepcopy(model))
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-6)
    lk.unload(model)
    assert type(model.a) is nn.Linear and model.b is model.a
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    plain.load_state_dict(model.state_dict(), strict=True)


def test_shared_block_in_a_module_list_is_adapted_once():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    model = lk.inject(nn.Sequential(*[block] * 3), rank=2, order=2)
    assert len(list(lk.nn.lie_layers(model))) == 1
    assert all(model[i][0] is model[0][0] for i in range(3))
    randomise(model)
    x = torch.randn(2, 6)
    want = model(x)
    torch.testing.assert_close(lk.unload(model)(x), want, rtol=1e-5, atol=1e-6)


# -- transformer fast paths --------------------------------------------------------
D, HEADS, FF = 8, 2, 16


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, x.flip(1))


def _transformer(kind):
    torch.manual_seed(0)
    if kind == "encoder_layer":
        return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    if kind == "encoder":
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    return Decoder()


MASK = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # a padded second row


def _run(model, kind, x, mode):
    model.train(mode == "train")
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        return model(x, src_key_padding_mask=MASK) if kind == "encoder" else model(x)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("mode", ["eval_no_grad", "eval_grad", "train"])
@pytest.mark.parametrize("targets", [["linear1", "linear2"], ["out_proj"], None])
@pytest.mark.parametrize("kind", ["encoder_layer", "encoder", "decoder_layer"])
def test_transformer_output_equals_merged_and_unloaded(kind, targets, mode):
    model = randomise(lk.inject(_transformer(kind), targets, rank=2, order=2))
    x = torch.randn(2, 5, D)
    want = _run(model, kind, x, mode)
    for fold in (lk.merge, lk.unload):
        got = _run(fold(copy.deepcopy(model)), kind, x, mode)
        # torch pads with zeros only on its nested-tensor path, taken when no first-layer
        # weight requires grad: W' does, a merged W does not. Compare the real tokens.
        real = ~MASK if kind == "encoder" and mode == "eval_grad" else slice(None)
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=2e-5)


def test_encoder_layer_reads_adapted_weights_while_it_runs():
    # torch._transformer_encoder_layer_fwd (eval fast path) reads these attributes itself
    model = randomise(lk.inject(_transformer("encoder_layer"), rank=2, order=2)).eval()
    lies = {n: model.get_submodule(n) for n in ("linear1", "linear2", "self_attn.out_proj")}
    seen = {}
    model.register_forward_pre_hook(  # runs after inject's hook
        lambda mod, args: seen.update({n: m.weight for n, m in lies.items()}))
    with torch.no_grad():
        model(torch.randn(2, 5, D))
        for n, m in lies.items():
            torch.testing.assert_close(seen[n], m.adapted_weight(), rtol=0, atol=0)
            assert m.weight is m.base.weight  # outside the forward: W


# -- threads -----------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0])


def _attention_model():
    torch.manual_seed(0)
    model = randomise(lk.inject(Attention(), rank=2, order=2)).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        return model, x, model(x)


def test_another_threads_forward_does_not_hide_the_adapted_weight():
    # thread A stops inside MultiheadAttention.forward, after inject's pre-hook, while
    # thread B runs a whole forward; A then reads out_proj.weight and must get W'
    model, x, want = _attention_model()
    a_inside, b_done, got = threading.Event(), threading.Event(), {}

    def pause(mod, args):
        if threading.current_thread().name == "A":
            a_inside.set()
            b_done.wait(10)
    model.att.register_forward_pre_hook(pause)

    def run(name):
        with torch.no_grad():
            got[name] = model(x)
    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_inside.wait(10)
    run("B")
    b_done.set()
    a.join()
    torch.testing.assert_close(got["B"], want, rtol=0, atol=0)
    torch.testing.assert_close(got["A"], want, rtol=0, atol=0)


def test_threads_sharing_an_adapted_attention_model_see_their_own_weights():
    model, x, want = _attention_model()
    wrong, errors, stop = [], [], time.monotonic() + 10

    def work(i):
        try:
            for step in range(400):
                if time.monotonic() > stop:
                    break
                # alternate the MHA fast path (no grad) and the differentiable path
                with torch.set_grad_enabled((i + step) % 2 == 1):
                    got = model(x)
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    wrong.append((i, step))
        except Exception as exc:  # noqa: BLE001  (reported below, not lost in the thread)
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not wrong, (errors, wrong[:5], len(wrong))
    assert model.att.out_proj.weight is model.att.out_proj.base.weight


# -- inject checks everything before it changes anything -----------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


BAD_CALLS = [
    (dict(trainable=["typo"]), ValueError, r"trainable: 'typo' matches no module"),
    (dict(trainable=[nn.LayerNorm]), ValueError, r"trainable: Sequential has no LayerNorm"),
    (dict(trainable=True), TypeError, r"trainable must be a name pattern \(str\), an "
                                      r"nn.Module type or a list of them, got bool True"),
    (dict(trainable=["head("]), ValueError, r"trainable: entry 'head\(' is not a valid regex"),
    (dict(target_modules=["conv[1"]), ValueError,
     r"target_modules: entry 'conv\[1' is not a valid regex"),
    (dict(target_modules=3), TypeError, r"target_modules must be a name pattern"),
    (dict(rank=0), ValueError, r"rank must be an int >= 1"),
    (dict(rank=(2, 2, 1, 1)), ValueError, r"rank must be an int >= 1 for "
                                          r"parametrization='lowrank', got \(2, 2, 1, 1\)"),
    (dict(order=-1), ValueError, r"order must be an int >= 0"),
    (dict(order=1.5), TypeError, r"order must be an int >= 0 or None"),
    (dict(scale=float("inf")), ValueError, r"scale must be a finite real number"),
    (dict(scale=4e38), ValueError, r"scale must be at most 3.40282e\+38 in magnitude"),
    (dict(alpha=1.0, scale=1.0), ValueError, r"give alpha .* or scale, not both"),
    (dict(parametrization="cp"), ValueError, r"parametrization must be one of"),
    (dict(backend="gpu"), ValueError, r"backend must be 'auto' or one of"),
    (dict(rnak=2), TypeError, r"inject: unknown layer option 'rnak'; the options are rank"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CALLS,
                         ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))[:12]
                              for k, _, _ in BAD_CALLS])
def test_rejected_inject_leaves_the_model_untouched(kwargs, exc, match):
    # rank=(2, 2, 1, 1) suits the conv: only the Linear, built second, refuses it
    model = _small()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        lk.inject(model, **kwargs)
    assert_untouched(model, before)
    lk.inject(model, rank=2, trainable=[nn.BatchNorm2d])  # the corrected retry works
    # a second inject is checked as thoroughly: hooks, flags and layers stay as they are
    model = lk.inject(nn.Sequential(Attention(), nn.Linear(3, 3)), "out_proj", rank=2)
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        lk.inject(model, **{"target_modules": "1", **kwargs})
    assert_untouched(model, before)


def test_second_inject_keeps_what_the_first_made_trainable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    lk.inject(model, "0", rank=2, trainable=["4", nn.BatchNorm2d])
    kept = [model[1].weight, model[1].bias, model[4][1].weight, model[4][1].bias]
    assert all(p.requires_grad for p in kept) and not model[3].weight.requires_grad
    lk.inject(model, "3", rank=2)  # no trainable: only what it adapts gets frozen
    assert all(p.requires_grad for p in kept)
    assert not model[3].base.weight.requires_grad and model[3].lie_core.requires_grad
    lk.inject(model, "4.1", rank=2)  # adapting a trainable layer freezes its W and bias
    assert not model[4][1].base.weight.requires_grad and not model[4][1].base.bias.requires_grad
    assert model[1].weight.requires_grad and model[4][1].lie_b.requires_grad


# -- errors that say what is wrong -------------------------------------------------
@pytest.mark.parametrize("layer,wrapper", [(nn.Linear(4, 3), "LieLinear"),
                                           (nn.Conv2d(3, 4, 3), "LieConv2d")])
def test_inject_on_a_bare_layer_says_to_wrap_it(layer, wrapper):
    before = snapshot(layer)
    with pytest.raises(TypeError, match=rf"inject: the model is itself a {type(layer).__name__}"
                                        rf".*lk.nn.{wrapper}\(layer, \.\.\.\)"):
        lk.inject(layer, rank=2)
    assert_untouched(layer, before)
    lie = lk.nn.LieLinear(nn.Linear(4, 3))
    before = snapshot(lie)
    with pytest.raises(TypeError, match=r"inject: the model is itself a LieLinear"):
        lk.inject(lie)
    assert_untouched(lie, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_beyond_the_compute_dtype_is_refused(dtype):
    base = nn.Linear(4, 3).to(dtype)
    with pytest.raises(ValueError, match=r"scale must be at most 3.40282e\+38 in magnitude "
                                         r"\(the largest finite torch.float32, the compute "
                                         rf"dtype of {dtype} weights\), got -4e\+38"):
        lk.nn.LieLinear(base, scale=-4e38)
    with pytest.raises(ValueError, match=r"alpha=8e\+38 gives scale = alpha / rank = 4e\+38; "
                                         r"scale must be at most 3.40282e\+38"):
        lk.nn.LieLinear(base, rank=2, alpha=8e38)
    assert base.weight.requires_grad  # refused before the layer froze W
    layer = lk.nn.LieLinear(base, scale=3e38)  # representable: accepted, runs
    assert torch.equal(layer(torch.ones(1, 4, dtype=dtype)), base(torch.ones(1, 4, dtype=dtype)))
    lk.nn.LieLinear(nn.Linear(4, 3).double(), scale=4e38)  # fp64 computes in fp64
