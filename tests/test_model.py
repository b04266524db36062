"""Model helpers: inject (targets, freezing, real model code), unload back to plain
layers, batch builds. Tiny inputs: each test runs in seconds."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lie_kernels as lk

from helpers import resnet18, three_layer_model, tiny_llama

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _train(model, x, target, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0]).mean(1)


def test_unload_round_trip_into_plain_resnet18():
    # a few layers of each kind keep it quick: stem, 3x3, strided 1x1 shortcut, head
    model = lk.inject(resnet18(), [r"^conv1$", "layer1.0.conv2", "layer3.0.downsample.0", "fc"],
                      rank=2, order=2, trainable=[nn.BatchNorm2d])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    _train(model, x, t, steps=2, lr=0.05)
    moved = [m.delta().abs().sum() for _, m in lk.nn.lie_layers(model)]
    assert len(moved) == 4 and all(d > 0 for d in moved)  # the factors moved: W' != W
    next(iter(lk.nn.lie_layers(model)))[1].merge()  # a merged layer unloads too
    model.eval()
    with torch.no_grad():
        want = model(x)
        assert not torch.allclose(want, resnet18().eval()(x), atol=1e-3)

    plain = lk.unload(model)
    assert plain is model and not list(lk.nn.lie_layers(model))
    assert type(model.conv1) is nn.Conv2d and type(model.layer1[0].conv1) is nn.Conv2d
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = resnet18()
    fresh.load_state_dict(torch.load(buf), strict=True)  # same keys, no lie_* left
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), want, rtol=1e-5, atol=1e-5)


def test_unload_removes_hooks_and_keeps_outputs():
    torch.manual_seed(0)
    model = lk.inject(_Attn(), rank=2)
    lk.nn.batch_builds(model)
    x = torch.randn(2, 5, 8)
    _train(model, x, torch.tensor([0, 2]))
    model.eval()
    with torch.no_grad():
        want = model(x)
    lk.merge_and_unload(model)
    assert not model._forward_pre_hooks and not model.att._forward_pre_hooks
    assert not model.att._forward_hooks
    assert type(model.att.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


# -- PEFT-like freezing ---------------------------------------------------------
def test_freezing_default_and_trainable_on_timm_convnext():
    torch.manual_seed(0)
    plain = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    n_plain = sum(p.numel() for p in plain.parameters())

    model = lk.inject(copy.deepcopy(plain), [nn.Conv2d], rank=2)
    factors = {id(p) for _, m in lk.nn.lie_layers(model) for p in m.parameters(recurse=False)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == factors
    counts = lk.trainable_parameters(model)
    n_factors = sum(p.numel() for p in model.parameters() if id(p) in factors)
    assert counts == (n_factors, n_factors, n_plain) and counts.total == n_factors + n_plain
    assert "adapter" in str(counts)

    model = lk.inject(copy.deepcopy(plain), [nn.Conv2d], rank=2,
                      trainable=["head.fc", nn.LayerNorm])
    keep = list(model.head.fc.parameters()) + [
        p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    assert len(keep) > 2
    assert ({id(p) for p in model.parameters() if p.requires_grad}
            == factors_of(model) | {id(p) for p in keep})
    trainable, adapter, base = lk.trainable_parameters(model)
    assert trainable == adapter + sum(p.numel() for p in keep) and base == n_plain

    x = torch.randn(1, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([3])).backward()
    for p in model.parameters():
        assert (p.grad is not None) == p.requires_grad

    with pytest.raises(ValueError, match=r"trainable: 'haed' matches no module"):
        lk.inject(copy.deepcopy(plain), [nn.Conv2d], trainable=["haed"])


def factors_of(model):
    return {id(p) for _, m in lk.nn.lie_layers(model) for p in m.parameters(recurse=False)}


def test_multihead_attention_out_proj_is_adapted_and_trained():
    torch.manual_seed(0)
    model, x = _Attn(), torch.randn(2, 5, 8)
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    lk.inject(model, rank=2)  # target None: out_proj (a Linear subclass) and head
    assert isinstance(model.att.out_proj, lk.nn.LieLinear)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), frozen(x))  # identity at init
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    # MultiheadAttention reads out_proj.weight directly: the hook must route W' there
    assert model.att.out_proj.lie_b.grad.abs().sum() > 0
    _train(model, x, torch.tensor([0, 1]))
    with torch.no_grad():
        model.head.lie_b.zero_()  # only out_proj's update left
        assert not torch.allclose(model.eval()(x), frozen(x), atol=1e-4)
    assert model.att.out_proj.weight is model.att.out_proj.base.weight  # outside forward


def test_weight_and_bias_views_on_resnet18():
    model = resnet18()
    w, b = model.fc.weight, model.fc.bias
    lk.inject(model, ["fc", "conv1"], rank=2)
    assert model.fc.weight is w and model.fc.bias is b and model.conv1.bias is None
    keys = list(model.state_dict())
    assert "fc.base.weight" in keys and "fc.weight" not in keys and "fc.bias" not in keys
    with pytest.raises(AttributeError, match=r"LieLinear.weight is read-only"):
        model.fc.weight = nn.Parameter(torch.zeros_like(w))
    assert "fc.weight" not in model.state_dict()


def test_regex_adapts_only_supported_layers_of_llama():
    model = tiny_llama()
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    lk.inject(model, ".*", r=2)  # matches containers, embeddings, norms too: skipped
    assert len(list(lk.nn.lie_layers(model))) == n_linear == 8
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    # transformers reads the output embeddings' .weight (resizing, tying)
    assert model.get_output_embeddings().weight is model.lm_head.base.weight


def test_second_inject_raises_or_adds_only_new_layers():
    model = tiny_llama()
    lk.inject(model, ["q_proj", "v_proj"], rank=2)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"that is not already a Lie layer \(2 are: "
                                         r"'model.layers.0.self_attn.q_proj'.*lk.unload"):
        lk.inject(model, ["q_proj", "v_proj"], rank=4)
    assert dict(model.named_modules()) == before  # untouched
    lk.inject(model, ["q_proj", "k_proj"], rank=2)  # q_proj skipped, k_proj added
    names = sorted(n.rsplit(".", 1)[-1] for n, _ in lk.nn.lie_layers(model))
    assert names == ["k_proj", "q_proj", "v_proj"]
    assert model.model.layers[0].self_attn.q_proj is before["model.layers.0.self_attn.q_proj"]


def test_batch_builds_clears_prebuilt_weights_after_an_exception():
    model = three_layer_model()
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
