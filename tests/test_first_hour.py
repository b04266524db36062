"""A user's first hour (issue 11): the way back to plain layers, PEFT-like freezing,
early validation, and fitting real models (torchvision, timm, transformers,
nn.MultiheadAttention) and PEFT's HiRA. Tiny inputs: each test runs in seconds."""
import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lie_kernels as lk

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


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


# -- 2. unload: back to plain layers ------------------------------------------------
def test_unload_round_trip_into_plain_resnet18():
    # a few layers of each kind keep it quick: stem, 3x3, strided 1x1 shortcut, head
    model = lk.inject(_resnet(), [r"^conv1$", "layer1.0.conv2", "layer3.0.downsample.0", "fc"],
                      rank=2, order=2, trainable=[nn.BatchNorm2d])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    _train(model, x, t, steps=2, lr=0.05)
    moved = [m.delta().abs().sum() for _, m in lk.nn.lie_layers(model)]
    assert len(moved) == 4 and all(d > 0 for d in moved)  # the factors moved: W' != W
    next(iter(lk.nn.lie_layers(model)))[1].merge()  # a merged layer unloads too
    model.eval()
    with torch.no_grad():
        want = model(x)
        assert not torch.allclose(want, _resnet().eval()(x), atol=1e-3)

    plain = lk.unload(model)
    assert plain is model and not list(lk.nn.lie_layers(model))
    assert type(model.conv1) is nn.Conv2d and type(model.layer1[0].conv1) is nn.Conv2d
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _resnet()
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


# -- 3. PEFT-like freezing ---------------------------------------------------------
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


# -- 4. validation at construction -------------------------------------------------
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


# -- 6. real models ----------------------------------------------------------------
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


def test_unadaptable_subclass_is_explained():
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
        lk.inject(_resnet(), "no_such_layer")


def test_weight_and_bias_views_on_resnet18():
    model = _resnet()
    w, b = model.fc.weight, model.fc.bias
    lk.inject(model, ["fc", "conv1"], rank=2)
    assert model.fc.weight is w and model.fc.bias is b and model.conv1.bias is None
    keys = list(model.state_dict())
    assert "fc.base.weight" in keys and "fc.weight" not in keys and "fc.bias" not in keys
    with pytest.raises(AttributeError, match=r"LieLinear.weight is read-only"):
        model.fc.weight = nn.Parameter(torch.zeros_like(w))
    assert "fc.weight" not in model.state_dict()


def test_regex_adapts_only_supported_layers_of_llama():
    model = _llama()
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
    model = _llama()
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


# -- 6. PEFT fit -------------------------------------------------------------------
def test_fp32_factors_with_16_bit_weight():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.randn(9, 7, dtype=dtype)
        a, b = torch.randn(3, 7, requires_grad=True), torch.randn(9, 3, requires_grad=True)
        got = lk.lie_weight_lowrank(w, a, b, order=2, scale=0.1)
        x = 0.1 * (b.double() @ a.double())
        ref = w.double() * (1 + x + x * x / 2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -7, atol=0)
        got.float().sum().backward()
        assert a.grad.dtype == b.grad.dtype == torch.float32
    with pytest.raises(TypeError, match=r"b must have the weight's dtype torch.float32, "
                                        r"got torch.float64"):
        lk.lie_weight_lowrank(w.float(), a.double(), b.double())


def _hira_llama(dtype):
    model = _llama().to(dtype)
    cfg = peft.HiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    hira = peft.get_peft_model(model, cfg)  # default autocast_adapter_dtype=True
    for n, p in hira.named_parameters():
        if "hira_B" in n:
            nn.init.normal_(p, std=0.2)  # PEFT starts B at 0: make the update non-zero
    return hira


def test_patch_hira_fuses_bf16_with_fp32_factors(monkeypatch):
    from lie_kernels.integrations import peft as lkpeft
    hira = _hira_llama(torch.bfloat16)
    factor_dtypes = {p.dtype for n, p in hira.named_parameters() if "hira_" in n}
    assert factor_dtypes == {torch.float32}  # PEFT's autocast of the adapters
    ids = torch.randint(0, 32, (1, 6))
    ref = copy.deepcopy(hira).double()
    with torch.no_grad():
        want64 = ref(ids).logits
        peft_bf16 = hira(ids).logits
    fused = []
    real = lkpeft._fusable
    monkeypatch.setattr(lkpeft, "_fusable", lambda *a: fused.append(real(*a)) or fused[-1])
    handle = lkpeft.patch_hira(hira)
    got = hira(ids).logits
    assert fused == [True] * 3
    got.float().sum().backward()  # fp32 factor grads through the fused op
    assert hira.base_model.model.model.layers[0].self_attn.q_proj.hira_B["default"].grad \
        .abs().sum() > 0
    err_fused = (got.detach().double() - want64).abs().max()
    err_peft = (peft_bf16.double() - want64).abs().max()
    assert err_fused <= 2 * err_peft + 1e-3, (err_fused, err_peft)
    handle.remove()
    handle.remove()  # idempotent
    assert type(hira.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


_LOAD = """
import sys, torch
m = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
torch.testing.assert_close(m(x), torch.load(sys.argv[3]))
print(type(m.base_model.model[0]).__name__)
"""


def test_patched_hira_model_survives_save_and_load_in_a_fresh_process(tmp_path):
    from lie_kernels.integrations.peft import patch_hira
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    hira = peft.get_peft_model(net, peft.HiraConfig(r=2, target_modules=["0", "3"]))
    patch_hira(hira)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = hira(x)
    torch.save(hira, tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-c", _LOAD, *(str(tmp_path / f)
                          for f in ("m.pt", "x.pt", "y.pt"))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "_FusedConv2d"  # still patched after loading


def test_patch_hira_conv3d_with_unit_leading_kernel_dims():
    """PEFT 0.21.2's own HiRA fails on Conv3d kernels (1, 1, k) (README); the fused path
    computes W ⊙ exp_1(B@A) there like on any other kernel."""
    from lie_kernels.integrations.peft import patch_hira
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, (1, 1, 3)))
    hira = peft.get_peft_model(net, peft.HiraConfig(r=2, target_modules=["0"]))
    layer = hira.base_model.model[0]
    nn.init.normal_(layer.hira_B["default"])
    x = torch.randn(1, 2, 3, 3, 5)
    with patch_hira(hira):
        got = hira(x)
    w = layer.get_base_layer().weight.double()
    a, b = layer.hira_A["default"].double(), layer.hira_B["default"].double()
    w2 = w * (1 + (b.reshape(4, -1) @ a.reshape(2, -1)).view(w.shape))
    want = F.conv3d(x.double(), w2, layer.get_base_layer().bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", [dict(use_dora=True), dict(use_rslora=True),
                                    dict(init_lora_weights="gaussian"),
                                    dict(fan_in_fan_out=True), dict(lora_dropout=0.1)],
                         ids=lambda o: next(iter(o)))
def test_liera_config_refuses_options_it_would_ignore(option):
    from lie_kernels.integrations.peft import liera_config
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"liera_config: {name}"):
        liera_config(r=2, target_modules=["0"], **option)
    with pytest.raises(ValueError, match=rf"liera_config: {name}"):
        liera_config(peft.LoraConfig(r=2, target_modules=["0"], **option))
