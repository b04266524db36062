"""PEFT integration against the real PEFT: HiRA on the fused op gives PEFT's own outputs and
gradients; LieRA as a PEFT LoRA custom module matches lie_kernels and saves, loads, merges."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
import lie_kernels as lk  # noqa: E402
from lie_kernels.integrations.peft import LieraLayer, liera_config, patch_hira  # noqa: E402
from helpers import outputs_and_grads  # noqa: E402


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
    real = integration.lie_layer
    monkeypatch.setattr(integration, "lie_layer",
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
