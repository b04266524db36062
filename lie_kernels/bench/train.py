"""One AdamW training step of real models: LieRA orders vs PEFT LoRA, PEFT HiRA and full FT.

Models come from their own libraries with random weights (nothing is downloaded):

* ``resnet18``: torchvision ResNet-18, every Conv2d adapted;
* ``convnext``: timm ConvNeXt-atto, the depthwise 7x7 convs and the Linear MLPs adapted
  (PEFT cannot adapt the depthwise convs: its rows adapt the MLPs only);
* ``convnext-mlp``: the same model with the Linear MLPs adapted by every method, so the
  LieRA and PEFT rows adapt the same layers;
* ``llama-qv`` / ``llama-all``: transformers Llama from a small config (hidden 512,
  4 layers), adapting q_proj/v_proj (PEFT's MetaMathQA setting) or every linear layer;
* ``llama-all-nf4`` / ``llama-all-int8``: ``llama-all`` with every decoder linear layer
  in bitsandbytes ``Linear4bit`` (nf4, QLoRA's setting) or ``Linear8bitLt`` (LLM.int8);
  PEFT adapts them with its bitsandbytes layers, full fine-tuning is not run.

Every method gets the same rank and targets. Each (model, method) runs in fresh
processes, ``repeats`` rounds of them, every (model, method) of the run once a round
(method by method, alternate rounds reversed: ``round_order``): median step time of the
steps after two untimed ones, and the peak memory of those two above what was live
before them, which includes the AdamW state: the most tensor memory live at once as
PyTorch's allocator counts it (``measure.peak_mib``; on CPU scratch memory that oneDNN,
MKL or bitsandbytes' native code allocate themselves is not seen).
A row gives the medians over its processes and the range of its peaks. Its ratios are
paired: the median over rounds of its step (peak) over the reference's in the same
round, so a machine that drifts between rounds moves both alike. References: PEFT LoRA
on the same model (every row); on a quantized model also PEFT HiRA on the same model and
the same method on the unquantized ``llama-all`` (the QLoRA targets: the op against
PEFT's HiRA on that base, and what quantizing the base costs). Output: table, CSV, PNG,
and ``train-processes.csv``: every process's own step time and peak.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import measure

#: ``llama-all`` with its decoder's linear layers in bitsandbytes 4 or 8 bits (QLoRA's base)
QUANTIZED = {"llama-all-nf4": "nf4", "llama-all-int8": "int8"}
#: the model a quantized one quantizes
UNQUANTIZED = dict.fromkeys(QUANTIZED, "llama-all")
MODELS = ["resnet18", "convnext", "convnext-mlp", "llama-qv", "llama-all", *QUANTIZED]
#: the method that trains W itself, which a quantized base does not allow
FULL = "full fine-tune"
METHODS = ["PEFT LoRA", "PEFT HiRA", "PEFT HiRA + patch_hira", "LieRA order=1",
           "LieRA order=4", "LieRA order=exact", FULL]
REFERENCE = "PEFT LoRA"
#: every method's rank unless ``--rank`` says otherwise
RANK = 16
#: command-line keys of the methods
METHOD_KEYS = dict(zip(["lora", "hira", "hira-patched", "liera1", "liera4", "liera-exact",
                        "full"], METHODS))
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: (batch, image size, sequence length, timed steps, fresh processes per row): full run /
#: --quick (CI). On a shared machine step times drift from one process to the next;
#: rounds that run every row once, and ratios taken within a round, steady the ratios.
SETTINGS = {"full": dict(batch=8, size=96, seq=256, steps=6, repeats=3),
            "quick": dict(batch=2, size=32, seq=32, steps=1, repeats=1)}
#: --quick is a smoke test of the command, not a measurement: 2 fresh processes (the
#: reference and LieRA; each costs about 8 s of imports and set-up on a 2-core CPU)
QUICK_MODELS = ["resnet18"]
QUICK_METHODS = [REFERENCE, "LieRA order=exact"]


# -- models -----------------------------------------------------------------------------
def build(model_name: str, batch: int, size: int, seq: int, device: str):
    """``(model, inputs, loss_fn, target module names)`` with random weights."""
    torch.manual_seed(0)
    if model_name == "resnet18":
        import torchvision
        model = torchvision.models.resnet18(num_classes=100)
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    elif model_name in ("convnext", "convnext-mlp"):
        import timm
        model = timm.create_model("convnext_atto", pretrained=False, num_classes=100)
        names = ("mlp.fc1", "mlp.fc2") + (("conv_dw",) if model_name == "convnext" else ())
        targets = [n for n, m in model.named_modules() if n.endswith(names)]
    elif model_name.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          max_position_embeddings=max(seq, 64))
        model = LlamaForCausalLM(cfg)
        if model_name in QUANTIZED:
            _quantize_decoder(model, QUANTIZED[model_name])
        names = ["q_proj", "v_proj"] if model_name == "llama-qv" else LLAMA_ALL
        targets = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    else:
        raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")
    model = model.to(device)  # quantizes the bitsandbytes weights
    if model_name.startswith("llama"):
        ids = torch.randint(0, 4096, (batch, seq), device=device)
        return model, ids, (lambda m, x: m(input_ids=x, labels=x).loss), targets
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    return model, x, (lambda m, inp: F.cross_entropy(m(inp), y)), targets


def _quantize_decoder(model: nn.Module, kind: str) -> None:
    """Every nn.Linear of the decoder layers (not lm_head nor the embeddings) becomes a
    bitsandbytes layer holding its dense weight, quantized by the model's ``.to(device)``;
    QLoRA's 4-bit setting (nf4, fp32 compute, double-quantized statistics) or LLM.int8.
    The ``is_loaded_in_*`` flag is what PEFT reads to pick its bitsandbytes layers."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            args = (lin.in_features, lin.out_features, lin.bias is not None)
            if kind == "nf4":
                q = bnb.nn.Linear4bit(*args, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4",
                                             module=q)
            else:
                q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False,
                                             has_fp16_weights=False)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)


def adapt(model: nn.Module, method: str, targets: List[str], rank: int) -> nn.Module:
    """``model`` with ``method``'s trainable parameters (same rank and targets for all)."""
    if method == FULL:
        return model.requires_grad_(True)
    if method.startswith("LieRA"):
        import lie_kernels as lk
        order = method.split("=")[1]
        return lk.inject(model, target_modules=targets, rank=rank, alpha=rank,
                         order=None if order == "exact" else int(order))
    import peft
    # PEFT 0.21 refuses grouped convs (LoRA: rank must be a multiple of groups; HiRA:
    # groups > 1 unsupported): for ConvNeXt its methods skip the depthwise 7x7 convs,
    # so their rows adapt fewer layers than LieRA's (the "targets" column)
    targets = [t for t in targets if getattr(model.get_submodule(t), "groups", 1) == 1]
    if method == REFERENCE:
        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    else:
        cfg = peft.HiraConfig(r=rank, target_modules=targets)
    model = peft.get_peft_model(model, cfg)
    if method.endswith("patch_hira"):
        from lie_kernels.integrations.peft import patch_hira
        patch_hira(model)
    return model


def stepper(model: nn.Module, inputs, loss_fn):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, inputs).backward()
        opt.step()
    return step


# -- one (model, method) in this process --------------------------------------------------
def _adapted_layers(model: nn.Module) -> int:
    import lie_kernels as lk
    peft_types = ()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        peft_types = (BaseTunerLayer,)
    except ImportError:
        pass
    return sum(isinstance(m, (lk.nn.LieLayer, *peft_types)) for m in model.modules())


def measure_one(model_name: str, method: str, device: str, rank: int, batch: int, size: int,
                seq: int, steps: int) -> Dict:
    model, inputs, loss_fn, targets = build(model_name, batch, size, seq, device)
    model = adapt(model, method, targets, rank)
    adapted = len(targets) if method == FULL else _adapted_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = stepper(model, inputs, loss_fn)
    import lie_kernels as lk
    # the backend probe (it imports triton) is a set-up cost: paid here by every method
    # alike, outside the measured steps
    lk.available_backends()
    # the peak spans the warm-up step, which allocates the AdamW state, and one more,
    # whose forward and backward run with that state live; neither is timed (the CPU
    # allocator's events are recorded by torch.profiler, which slows the steps it watches)
    peak = measure.peak_mib(lambda: (step(), step()), device)
    if peak is None:
        raise RuntimeError("this torch does not record the CPU allocator's events")
    times = []
    for _ in range(steps):
        measure.sync(device)
        t0 = time.perf_counter()
        step()
        measure.sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(model=model_name, method=method, targets=adapted, trainable=trainable,
                ms=statistics.median(times), peak_mib=peak)


def _median_row(runs: List[Dict]) -> Dict:
    """One row from a (model, method)'s processes: medians of step time and peak, the
    peaks' range; the first error if any process failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    peaks = [r["peak_mib"] for r in runs]
    return dict(runs[0], ms=statistics.median(r["ms"] for r in runs),
                peak_mib=statistics.median(peaks), peak_min=min(peaks), peak_max=max(peaks),
                runs=len(runs))


def _fresh(model_name: str, method: str, device: str, rank: int, s: Dict) -> Dict:
    args = [sys.executable, "-m", "lie_kernels.bench.train", model_name, method, device,
            str(rank), *(str(s[k]) for k in ("batch", "size", "seq", "steps"))]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(model=model_name, method=method, error=err[:200])
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the benchmark ------------------------------------------------------------------------
def round_order(pairs: List[tuple], i: int) -> List[tuple]:
    """The (model, method) pairs in the order round ``i`` runs them: method by method, a
    method's models one after the other, so a quantized row runs next to its unquantized
    twin (the tight "within 1.10x" pair: seconds apart, not the minutes of a model's other
    rows); every other round in reverse, so a drift within a round favours no position."""
    methods = list(dict.fromkeys(meth for _, meth in pairs))
    order = sorted(pairs, key=lambda pair: methods.index(pair[1]))  # stable: models in order
    return order[::-1] if i % 2 else order


#: the references of a row's ratios: name -> the (model, method) it is compared with, or
#: None where it has none
REFERENCES = {
    "lora": lambda model, method: (model, REFERENCE),
    "hira": lambda model, method: (model, "PEFT HiRA") if model in QUANTIZED else None,
    "dense": lambda model, method: ((UNQUANTIZED[model], method) if model in QUANTIZED
                                    else None),
}
COLUMNS = ["model", "method", "targets", "trainable", "ms", "peak_mib", "peak_min",
           "peak_max", "runs", *(f"{q}_vs_{ref}" for ref in REFERENCES for q in ("time", "mem")),
           "error"]


def _paired_ratio(runs: List[Dict], ref_runs: List[Dict], key: str) -> float:
    """The median over rounds of ``runs[i][key] / ref_runs[i][key]``: both measured in
    the same round, minutes apart at most, so drift between rounds cancels."""
    return statistics.median(a[key] / max(b[key], 1e-9) for a, b in zip(runs, ref_runs))


def _add_ratios(rows: List[Dict], runs: Dict[tuple, List[Dict]]) -> None:
    for r in rows:
        for name, ref_of in REFERENCES.items():
            ref = ref_of(r["model"], r["method"])
            if "error" in r or ref not in runs or any("error" in x for x in runs[ref]):
                continue
            mine = runs[(r["model"], r["method"])]
            r[f"time_vs_{name}"] = _paired_ratio(mine, runs[ref], "ms")
            r[f"mem_vs_{name}"] = _paired_ratio(mine, runs[ref], "peak_mib")


def run(device: str, log=print, models: Optional[List[str]] = None,
        methods: Optional[List[str]] = None, rank: int = RANK, quick: bool = False,
        out: Optional[str] = None, repeats: Optional[int] = None,
        batch: Optional[int] = None, seq: Optional[int] = None) -> List[Dict]:
    """The table; ``repeats``, ``batch`` and ``seq`` override the setting's own."""
    s = dict(SETTINGS["quick" if quick else "full"])
    s.update({k: v for k, v in dict(repeats=repeats, batch=batch, seq=seq).items()
              if v is not None})
    # a name given twice is one row (its processes would otherwise be pooled twice)
    models = list(dict.fromkeys(models or (QUICK_MODELS if quick else MODELS)))
    methods = list(dict.fromkeys(methods or (QUICK_METHODS if quick else METHODS)))
    log(f"# training step, AdamW, rank {rank}, {device}; images: batch {s['batch']} at "
        f"{s['size']}x{s['size']}, Llama: batch {s['batch']} x {s['seq']} tokens; median of "
        f"{s['steps']} steps after 2 untimed ones; peak = "
        + ("max_memory_allocated" if device == "cuda" else "the CPU allocator's events")
        + " over the 2 untimed steps, above the memory live before them; "
        f"{s['repeats']} round(s) of fresh processes, each row once a round: medians over "
        "them, peak range in brackets; ratios: medians over rounds of the row over its "
        "reference in the same round")
    skipped = [m for m in models if m in QUANTIZED] if FULL in methods else []
    if skipped:
        log(f"# {FULL}: not run on {', '.join(skipped)}: a quantized base weight is "
            "stored as integer codes, which take no gradient")
    pairs = [(m, meth) for m in models for meth in methods
             if not (m in skipped and meth == FULL)]
    runs: Dict[tuple, List[Dict]] = {pair: [] for pair in pairs}
    for i in range(s["repeats"]):
        for m, meth in round_order(pairs, i):
            runs[(m, meth)].append(_fresh(m, meth, device, rank, s))
    rows = [_median_row(runs[pair]) for pair in pairs]
    _add_ratios(rows, runs)
    # the HiRA and dense references exist for quantized models only
    shown = [ref for ref in REFERENCES if ref == "lora" or any(m in QUANTIZED for m in models)]
    heads = {"lora": "LoRA", "hira": "HiRA", "dense": "dense"}
    log(f"{'model':<15}{'method':<24}{'targets':>8}{'trainable':>11}{'step ms':>10}"
        f"{'peak MiB':>10}{'[range]':>15}"
        + "".join(f"{'time/' + heads[x]:>11}{'mem/' + heads[x]:>11}" for x in shown))
    for r in rows:
        if "error" in r:
            log(f"{r['model']:<15}{r['method']:<24}  failed: {r['error']}")
            continue
        span = f"[{r['peak_min']:.0f}-{r['peak_max']:.0f}]"
        ratios = [r.get(f"{q}_vs_{x}") for x in shown for q in ("time", "mem")]
        log(f"{r['model']:<15}{r['method']:<24}{r['targets']:>8}{r['trainable']:>11}{r['ms']:>10.1f}"
            f"{r['peak_mib']:>10.1f}{span:>15}"
            + "".join(f"{'-' if v is None else f'{v:.2f}':>11}" for v in ratios))
    if out:
        write_csv(rows, os.path.join(out, "train.csv"))
        # every process's own numbers, so the spread behind a median can be seen
        write_csv([dict(x, round=i) for pair in pairs for i, x in enumerate(runs[pair])],
                  os.path.join(out, "train-processes.csv"), PROCESS_COLUMNS)
        plot(rows, os.path.join(out, "train.png"),
             f"{FULL}: not run on {', '.join(skipped)} (quantized base)"
             if skipped else None)
        log(f"# wrote {os.path.join(out, 'train.csv')}, train-processes.csv (one line a "
            "process) and train.png")
    return rows


PROCESS_COLUMNS = ["round", "model", "method", "ms", "peak_mib", "error"]


def write_csv(rows: List[Dict], path: str, columns: List[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)


def plot(rows: List[Dict], path: str, note: Optional[str] = None) -> None:
    """Step time and peak memory as ratios to PEFT LoRA, one group of bars per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "time_vs_lora" in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), sharey=False)
    width = 0.8 / max(len(methods), 1)
    for ax, key, title in zip(axes, ("time_vs_lora", "mem_vs_lora"),
                              ("step time / PEFT LoRA", "peak memory / PEFT LoRA")):
        for j, meth in enumerate(methods):
            vals = [next((r[key] for r in ok if r["model"] == m and r["method"] == meth),
                         float("nan")) for m in models]
            ax.bar([i + j * width for i in range(len(models))], vals, width, label=meth)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models)
        ax.set_title(title)
    # beside the panel: inside it the legend (and its note) would hide bars
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title=note,
                   title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the fresh process of one row
    name, meth, dev, r, *ints = sys.argv[1:]
    b, sz, sq, n = map(int, ints)
    print(json.dumps(measure_one(name, meth, dev, int(r), b, sz, sq, n)))
