"""Forward+backward of the fused op against the baselines, one benchmark per method."""
import pytest
import torch

import lie_kernels as lk
from lie_kernels.bench import baselines, inputs
from lie_kernels.bench.shapes import SWEEP

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [c for c in SWEEP if c.name in (
    ["resnet50.3x3.256", "convnextv2b.dw7x7.1024"] if DEVICE == "cpu" else
    [c.name for c in SWEEP])]
BACKENDS = [n for n, (ok, _) in lk.available_backends().items()
            if ok and not (n == "triton" and DEVICE == "cpu")]


def _fwdbwd(fn, w, args, order, g):
    def run():
        out = fn(w, *args, order, 0.5)
        torch.autograd.grad(out, inputs.leaves(args), g)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("order", [1, 4, None], ids=["order1", "order4", "exact"])
@pytest.mark.parametrize("method", BACKENDS + ["eager"])
def test_tucker_fwdbwd(benchmark, case, order, method):
    w, args = inputs.make(case, "tucker", torch.float32, DEVICE)
    g = torch.randn_like(w)
    fn = (baselines.baseline_fns("tucker", order, False)["eager"] if method == "eager" else
          (lambda w, c, f, order, s: lk.lie_weight(w, c, f, order=order, scale=s,
                                                   backend=method)))
    benchmark.group = f"{case.name} tucker order={order}"
    benchmark(_fwdbwd(fn, w, args, order, g))


@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.name)
@pytest.mark.parametrize("method", BACKENDS + ["eager", "hira"])
def test_lowrank_order1_vs_hira(benchmark, case, method):
    w, args = inputs.make(case, "lowrank", torch.float32, DEVICE)
    g = torch.randn_like(w)
    fns = baselines.baseline_fns("lowrank", 1, False)
    fn = fns.get(method) or (lambda w, a, b, order, s: lk.lie_weight_lowrank(
        w, a, b, order=order, scale=s, backend=method))
    benchmark.group = f"{case.name} lowrank order=1"
    benchmark(_fwdbwd(fn, w, args, 1, g))


@pytest.mark.parametrize("method", ["PEFT LoRA", "PEFT HiRA + patch_hira", "LieRA order=1",
                                    "LieRA order=exact", "full fine-tune"])
@pytest.mark.parametrize("model_name", ["resnet18", "convnext", "llama-qv", "llama-all"])
def test_train_step(benchmark, model_name, method):
    """One AdamW step of a real model (``python -m lie_kernels.bench train``'s rows, in this
    process: time only; the CLI measures memory in fresh processes)."""
    from lie_kernels.bench import train
    s = train.SETTINGS["quick"]
    model, x, loss_fn, targets = train.build(model_name, s["batch"], s["size"], s["seq"], DEVICE)
    step = train.stepper(train.adapt(model, method, targets, rank=16), x, loss_fn)
    benchmark.group = f"train step {model_name}"
    benchmark(lambda: (step(), DEVICE == "cuda" and torch.cuda.synchronize()))
