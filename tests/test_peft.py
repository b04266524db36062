"""PEFT integration against the real PEFT: HiRA on the fused op gives PEFT's own outputs and
gradients; LieRA as a PEFT LoRA custom module matches lie_kernels and saves, loads, merges."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
import lie_kernels as lk  # noqa: E402
from lie_kernels.integrations.peft import LieraLayer, liera_config, patch_hira  # noqa: E402
from helpers import outputs_and_grads, tiny_llama  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv3d(6, 4, 3, padding=1)  # PEFT 0.21.2 HiRA breaks on 1x1x1 Conv3d kernels
        self.fc = nn.Linear(4 * 5 * 3, 7)

    def forward(self, x):
        y = self.c1(x)                                        # (N, 4, 5)
        y = self.c2(y.unsqueeze(-1).expand(-1, -1, -1, 3))    # (N, 6, 5, 3)
        y = self.c3(y.unsqueeze(-1)).squeeze(-1)              # (N, 4, 5, 3)
        return self.fc(y.flatten(1))


def _hira_model():
    torch.manual_seed(0)
    cfg = peft.HiraConfig(r=2, target_modules=["c1", "c2", "c3", "fc"])
    model = peft.get_peft_model(Net(), cfg)
    with torch.no_grad():  # B starts at zero: move it so the update is not trivially zero
        for n, p in model.named_parameters():
            if "hira_B" in n:
                p.normal_(0, 0.3)
    return model




def test_patched_hira_matches_peft():
    model = _hira_model()
    x = torch.randn(2, 3, 7)
    want = outputs_and_grads(model, x)
    with patch_hira(model) as patch:
        assert len(patch.layers) == 4
        got = outputs_and_grads(model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in patch.layers)  # restored


def test_patched_forward_is_the_fused_op(monkeypatch):
    import lie_kernels.integrations.peft as integration
    calls = []
    real = integration.lie_base_forward
    monkeypatch.setattr(integration, "lie_base_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _hira_model()
    patch_hira(model)
    model(torch.randn(2, 3, 7))
    assert len(calls) == 4
    calls.clear()
    with model.disable_adapter():  # falls back to PEFT's forward (the base model here)
        model(torch.randn(2, 3, 7))
    assert not calls


def test_patched_merge_matches():
    model = _hira_model()
    patch_hira(model)
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        before = model(x)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_patch_hira_needs_hira_layers():
    with pytest.raises(ValueError, match="no unpatched PEFT HiRA"):
        patch_hira(Net())


# -- LieRA as a PEFT LoRA custom module ------------------------------------------------

def _liera_model(**kw):
    torch.manual_seed(0)
    cfg = liera_config(r=2, lora_alpha=2, target_modules=["c1", "c2", "c3", "fc"], **kw)
    model = peft.get_peft_model(Net(), cfg)
    with torch.no_grad():  # move off the identity init
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def _as_lie_kernels(model, **kw):
    """The same model built with ``lk.inject`` and loaded with the PEFT model's weights."""
    ref = lk.inject(Net(), ["c1", "c2", "c3", "fc"], rank=2, alpha=2, **kw)
    state = {k.replace("base_model.model.", "").replace(".base_layer.", ".base.")
             .replace(".lora_A.default.", "."): v for k, v in model.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("lie_merged") for k in missing)
    return ref


@pytest.mark.parametrize("order,parametrization", [(1, "lowrank"), (2, "tucker"),
                                                    (None, None)])
def test_liera_peft_matches_lie_kernels(order, parametrization):
    model = _liera_model(order=order, parametrization=parametrization)
    assert sum(isinstance(m, LieraLayer) for m in model.modules()) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default.lie_" in n for n in trainable)
    ref = _as_lie_kernels(model, order=order, parametrization=parametrization)
    x = torch.randn(2, 3, 7)
    want = outputs_and_grads(ref, x)
    for g, w in zip(outputs_and_grads(model, x), want):
        torch.testing.assert_close(g, w)


def test_liera_peft_save_load_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _liera_model(order=2, parametrization="tucker")
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(tmp_path)
    cfg = liera_config(peft.LoraConfig.from_pretrained(tmp_path), order=2,
                       parametrization="tucker")
    torch.manual_seed(0)  # the same base weights as _liera_model
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path, config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, LieraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def test_liera_peft_merge_unmerge_round_trip():
    model = _liera_model(order=2, parametrization="tucker")
    x = torch.randn(2, 3, 7)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = model(x)
        model.merge_adapter()
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters()
                   if "base_layer" in n)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-7)


def _hira_llama(dtype):
    model = tiny_llama().to(dtype)
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


@pytest.mark.slow
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
