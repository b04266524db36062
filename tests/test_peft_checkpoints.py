"""LieRA adapters saved through PEFT describe themselves and load with PEFT's own calls.

Bitwise checks run in fresh processes where that is the point (a fresh process has no
registered classes and no leftover state); the rest run here.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from lie_kernels.integrations.peft import (  # noqa: E402
    LieraConfig, LieraLayer, liera_config, liera_from_hira, save_as_hira)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([HERE, ROOT])}

# (model kind, order, parametrization): Linear layers of a Llama and grouped/depthwise convs
CASES = [("llama", 1, "lowrank"), ("llama", 4, "lowrank"), ("llama", None, "lowrank"),
         ("llama", 4, "tucker"), ("conv", 1, "tucker"), ("conv", 4, "tucker"),
         ("conv", None, "tucker"), ("conv", 4, "lowrank")]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "conv": ["0", "2", "5"],
           "conv1": ["0", "3"]}
N_LAYERS = {"llama": 6, "conv": 3, "conv1": 2}  # LieRA layers the targets give


def base_model(kind):
    """The same base weights in every process (seeded, CPU)."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=16)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "conv1":  # no groups: HiRA has no grouped convs
        return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(6 * 5 * 5, 3)).eval()
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
                         nn.Flatten(), nn.Linear(8 * 5 * 5, 3)).eval()


def inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "llama":
        return torch.randint(0, 64, (2, 7), generator=g)
    return torch.randn(2, 4, 5, 5, generator=g)


@torch.no_grad()
def run(model, kind):
    x = inputs(kind)
    return model(input_ids=x).logits if kind == "llama" else model(x)


def config(kind, order, parametrization, **kw):
    return LieraConfig(r=2, lora_alpha=3, target_modules=TARGETS[kind], order=order,
                       parametrization=parametrization, **kw)


def trained(kind, order, parametrization, seed=2, adapter_name="default"):
    """A PEFT LieRA model whose factors are off the identity init (as after training)."""
    model = peft.get_peft_model(base_model(kind), config(kind, order, parametrization),
                                adapter_name=adapter_name)
    perturb(model, adapter_name, seed)
    return model


@torch.no_grad()
def perturb(model, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if f".lora_A.{adapter_name}.lie_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def python(code, *args, timeout=240):
    """Run ``code`` in a fresh interpreter; its stdout, or the failure with its stderr."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- what the folder says ------------------------------------------------------------------

def test_saved_folder_says_liera(tmp_path):
    model = trained("conv", 4, "tucker")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    import lie_kernels
    assert saved["peft_type"] == "LIERA"
    assert (saved["order"], saved["parametrization"], saved["scale"]) == (4, "tucker", None)
    assert (saved["r"], saved["lora_alpha"]) == (2, 3)  # scale = lora_alpha / r
    assert saved["lie_kernels_version"] == lie_kernels.__version__
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "- liera" in front and "- lora" not in front
    assert "import lie_kernels.integrations.peft" in card
    assert "PeftModel.from_pretrained(base_model," in card
    assert "- this folder: order=4, parametrization=tucker, scale=lora_alpha / r = 3 / 2" in card
    # in memory it stays LoRA for PEFT's code
    assert model.peft_config["default"].peft_type == peft.PeftType.LORA


def test_model_card_lists_named_adapters_once(tmp_path):
    model = trained("conv", None, "tucker")
    model.add_adapter("other", config("conv", 2, "lowrank", scale=0.5))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again updates, never duplicates
    card = (tmp_path / "README.md").read_text()
    assert card.count("## LieRA adapter") == 1
    assert card.count("- this folder: order=exact, parametrization=tucker") == 1
    assert card.count("- subfolder `other`: order=2, parametrization=lowrank, scale=0.5") == 1
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["scale"] == 0.5


def test_config_saved_alone_writes_no_card(tmp_path):
    config("conv", 1, None).save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["adapter_config.json"]
    for cls in (peft.PeftConfig, peft.LoraConfig):  # PEFT dispatches on the saved type
        loaded = cls.from_pretrained(tmp_path)
        assert isinstance(loaded, LieraConfig) and loaded.order == 1


def test_config_checks_name_the_argument():
    with pytest.raises(ValueError, match="parametrization must be one of"):
        LieraConfig(parametrization="cp")
    with pytest.raises(ValueError, match="lora_dropout must be 0"):
        LieraConfig(lora_dropout=0.1)
    with pytest.raises(ValueError, match="use_dora=True is a LoRA option"):
        LieraConfig(use_dora=True)
    with pytest.raises(TypeError, match="order must be an int"):
        LieraConfig(order=1.5)
    with pytest.raises(TypeError, match=r"only order, parametrization and scale.*\['r'\]"):
        liera_config(peft.LoraConfig(), r=4)


# -- load with PEFT's own calls ----------------------------------------------------------

@pytest.mark.parametrize("kind,order,parametrization", CASES)
def test_peft_from_pretrained_is_bitwise(tmp_path, kind, order, parametrization):
    model = trained(kind, order, parametrization)
    want = run(model, kind)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected keys
        loaded = peft.PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert sum(isinstance(m, LieraLayer) for m in loaded.modules()) == N_LAYERS[kind]
    assert torch.equal(run(loaded, kind), want)
    # and as a second adapter of another model
    other = trained(kind, 2, "lowrank", seed=5)
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    assert torch.equal(run(other, kind), want)


def test_liera_config_upgrades_an_old_lora_folder(tmp_path):
    """Folders saved before LieRA wrote its type say LORA: liera_config converts the config."""
    model = trained("conv", 2, "tucker")
    want = run(model, "conv")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("order", "parametrization", "scale", "lie_kernels_version"):
        del saved[key]
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "peft_type": "LORA"}))
    cfg = liera_config(peft.LoraConfig.from_pretrained(tmp_path), order=2,
                       parametrization="tucker")
    loaded = peft.PeftModel.from_pretrained(base_model("conv"), tmp_path, config=cfg)
    assert torch.equal(run(loaded, "conv"), want)
    # a wrong order is refused by the factors' own record of it, not loaded
    cfg = liera_config(peft.LoraConfig.from_pretrained(tmp_path), order=4,
                       parametrization="tucker")
    with pytest.raises(RuntimeError, match="order=2"):
        peft.PeftModel.from_pretrained(base_model("conv"), tmp_path, config=cfg)


@pytest.mark.slow
def test_fresh_process_loads_every_case_bitwise(tmp_path):
    jobs = []
    for n, (kind, order, parametrization) in enumerate(CASES):
        model = trained(kind, order, parametrization)
        model.save_pretrained(tmp_path / str(n))
        torch.save(run(model, kind), tmp_path / f"{n}.pt")
        jobs.append(f"{kind}:{tmp_path / str(n)}:{tmp_path / f'{n}.pt'}")
    out = python("""
        import sys, torch, peft
        import lie_kernels.integrations.peft  # registers LieRA with PEFT
        from test_peft_checkpoints import base_model, run
        for job in sys.argv[1:]:
            kind, folder, want = job.split(":")
            loaded = peft.PeftModel.from_pretrained(base_model(kind), folder)
            assert torch.equal(run(loaded, kind), torch.load(want)), folder
            merged = loaded.merge_and_unload()
            torch.testing.assert_close(run(merged, kind), torch.load(want), rtol=1e-5, atol=1e-5)
        print("ok", len(sys.argv) - 1)
        """, *jobs)
    assert out.split() == ["ok", str(len(CASES))]


@pytest.mark.slow
def test_plain_peft_refuses_the_folder(tmp_path):
    """Without lie_kernels, PEFT stops on the unknown type instead of loading the base model."""
    trained("conv", 4, "tucker").save_pretrained(tmp_path)
    out = python("""
        import sys, torch, peft
        from torch import nn
        base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 5 * 5, 3))
        for load in (lambda: peft.PeftModel.from_pretrained(base, sys.argv[1]),
                     lambda: peft.PeftConfig.from_pretrained(sys.argv[1])):
            try:
                load()
            except KeyError as e:
                print(repr(e))
        assert not any(m.startswith("lie_kernels") for m in sys.modules)
        """, tmp_path)
    assert out.split() == ["KeyError('LIERA')"] * 2


# -- pickling the whole model ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind,order,parametrization", [("llama", 4, "lowrank"),
                                                        ("conv", None, "tucker")])
def test_torch_save_load_whole_model(tmp_path, kind, order, parametrization):
    model = trained(kind, order, parametrization)
    torch.save(model, tmp_path / "model.pt")
    torch.save((inputs(kind), run(model, kind)), tmp_path / "io.pt")
    # the fresh process imports nothing of lie_kernels itself: unpickling must find it
    out = python("""
        import sys, torch
        model = torch.load(sys.argv[1], weights_only=False)
        x, want = torch.load(sys.argv[2])
        with torch.no_grad():
            y = model(input_ids=x).logits if sys.argv[3] == "llama" else model(x)
        assert torch.equal(y, want)
        print(type(model.base_model).__name__, sum(type(m).__name__ == "LieraLayer"
                                                   for m in model.modules()))
        """, tmp_path / "model.pt", tmp_path / "io.pt", kind)
    assert out.split() == ["LoraModel", str(N_LAYERS[kind])]


# -- several adapters --------------------------------------------------------------------

def _two_adapters(order_a, order_b, kind="conv"):
    model = trained(kind, order_a, "tucker", seed=2, adapter_name="one")
    model.add_adapter("two", config(kind, order_b, "lowrank"))
    perturb(model, "two", seed=3)
    return model


def test_switch_and_delete_match_a_model_with_that_adapter_only(tmp_path):
    model = _two_adapters(4, 2)
    alone_one = run(trained("conv", 4, "tucker", seed=2, adapter_name="one"), "conv")
    model.save_pretrained(tmp_path, selected_adapters=["two"])
    alone_two = run(peft.PeftModel.from_pretrained(base_model("conv"), tmp_path / "two"), "conv")
    assert torch.equal(run(model, "conv"), alone_one)
    model.set_adapter("two")
    assert torch.equal(run(model, "conv"), alone_two)
    with model.disable_adapter():
        assert torch.equal(run(model, "conv"), run(base_model("conv"), "conv"))
    model.delete_adapter("one")
    assert "one" not in model.peft_config and model.active_adapter == "two"
    assert torch.equal(run(model, "conv"), alone_two)
    assert not any(".lora_A.one." in k for k in model.state_dict())
    # the remaining adapter trains alone
    assert {n.split(".lora_A.")[1].split(".")[0]
            for n, p in model.named_parameters() if p.requires_grad} == {"two"}


def test_disable_adapter_on_a_merged_model_gives_the_base_model():
    model = trained("conv", 2, "tucker")
    want = run(model, "conv")
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, "conv"), run(base_model("conv"), "conv"),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(model, "conv"), want, rtol=1e-5, atol=1e-5)


def test_two_exact_adapters_compose_as_one_exp():
    model = _two_adapters(None, None)
    model.base_model.set_adapter(["one", "two"])
    x = torch.randn(2, 8, 5, 5)
    layer = model.base_model.model[2]  # the depthwise conv: Tucker "one" + lowrank "two"
    la, lb = layer.lora_A["one"], layer.lora_A["two"]
    w = layer.get_base_layer().weight
    with torch.no_grad():
        want = layer.get_base_layer()._conv_forward(
            x, w * torch.exp(la.scale * la.delta() + lb.scale * lb.delta()), layer.base_layer.bias)
    y = layer(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()  # one fused op, gradients reach both adapters
    assert all(p.grad is not None for p in (la.lie_core, lb.lie_a, lb.lie_b))


def test_several_truncated_adapters_are_refused():
    model = _two_adapters(4, None)
    model.base_model.set_adapter(["one", "two"])
    with pytest.raises(ValueError, match=r"orders \[4, None\].*exact exp"):
        run(model, "conv")
    with pytest.raises(ValueError, match="one LieRA adapter per layer can be merged"):
        model.merge_adapter(["one", "two"])


def test_lora_adapter_into_a_liera_layer_is_refused():
    model = trained("conv", 1, "tucker")
    with pytest.raises(TypeError, match="needs a LieraConfig, got a LoraConfig"):
        model.add_adapter("plain", peft.LoraConfig(r=2, target_modules=TARGETS["conv"]))


# -- HiRA interop --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "conv1"])
def test_order_one_lowrank_exports_as_plain_peft_hira(tmp_path, kind):
    ranks = {"v_proj": 3} if kind == "llama" else {"3": 1}  # HiRA's r: the largest
    model = peft.get_peft_model(base_model(kind), config(kind, 1, "lowrank", rank_pattern=ranks))
    perturb(model, "default", seed=4)
    save_as_hira(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HIRA"
    hira = peft.PeftModel.from_pretrained(base_model(kind), tmp_path)
    assert isinstance(hira.peft_config["default"], peft.HiraConfig)
    assert hira.peft_config["default"].r == max(2, *ranks.values())
    assert sum(isinstance(m, peft.tuners.hira.HiraLayer) for m in hira.modules()) \
        == N_LAYERS[kind]
    torch.testing.assert_close(run(hira, kind), run(model, kind), rtol=1e-5, atol=1e-5)


def test_hira_export_refuses_what_hira_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"layer base_model.model.0 .*order=4, HiRA is order 1"):
        save_as_hira(trained("conv1", 4, "lowrank"), tmp_path)
    with pytest.raises(ValueError, match="parametrization='tucker', HiRA is 'lowrank'"):
        save_as_hira(trained("conv1", 1, "tucker"), tmp_path)
    with pytest.raises(ValueError, match="groups=2, HiRA has no grouped convs"):
        save_as_hira(trained("conv", 1, "lowrank"), tmp_path)


@pytest.mark.parametrize("kind", ["llama", "conv1"])
def test_peft_hira_imports_as_liera_order_one(tmp_path, kind):
    torch.manual_seed(3)
    hira = peft.get_peft_model(base_model(kind), peft.HiraConfig(r=2,
                                                                 target_modules=TARGETS[kind]))
    with torch.no_grad():
        for n, p in hira.named_parameters():
            if "hira_B" in n:
                p.normal_(0, 0.3)
    hira.save_pretrained(tmp_path / "hira")
    config = liera_from_hira(tmp_path / "hira", tmp_path / "liera")
    assert (config.order, config.parametrization, config.scale) == (1, "lowrank", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing or unexpected keys
        liera = peft.PeftModel.from_pretrained(base_model(kind), tmp_path / "liera")
    assert sum(isinstance(m, LieraLayer) for m in liera.modules()) == N_LAYERS[kind]
    torch.testing.assert_close(run(liera, kind), run(hira, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["emb", "att", "conv1d"])
def test_targets_liera_does_not_adapt_are_refused(target):
    """An Embedding, MultiheadAttention or transformers Conv1D target would get a plain
    LoRA layer inside a folder that says LIERA (Conv1D's then would not even load back:
    PEFT sets fan_in_fan_out on the config); LieraConfig refuses it when the model is
    built, naming the layer type."""
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.att = nn.Embedding(10, 8), nn.MultiheadAttention(8, 2)
            self.conv1d, self.lin = Conv1D(8, 8), nn.Linear(8, 2)

    kind = {"emb": "Embedding", "att": "MultiheadAttention", "conv1d": "Conv1D"}[target]
    with pytest.raises(TypeError, match=rf"LieraConfig: target {kind} cannot get a LieRA "
                                        rf"adapter"):
        peft.get_peft_model(Mixed(), LieraConfig(r=2, target_modules=[target]))
    model = peft.get_peft_model(Mixed(), LieraConfig(r=2, target_modules=["lin"]))
    assert isinstance(model.base_model.model.lin, LieraLayer)
