"""The benchmark CLI explains itself: per-subcommand help, errors for bad input, legends,
unambiguous method names, min and median, meaningful CPU memory; and it runs end to end."""
import argparse
import ast
import csv
import re
import subprocess
import sys

import pytest
import torch

import lie_kernels as lk

from lie_kernels.bench import __main__ as cli
from lie_kernels.bench import cpu_core, measure, sweep


def _run(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "lie_kernels.bench", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _exit(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.parse(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_subcommand_has_its_own_help_and_every_flag_is_explained(capsys, command):
    code, out, _ = _exit(capsys, [command, "--help"])
    assert code == 0
    assert out.startswith(f"usage: python -m lie_kernels.bench {command}")
    assert cli.COMMANDS[command][0].split()[0] in out  # its own description
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_helps_differ_between_subcommands(capsys):
    texts = {c: _exit(capsys, [c, "--help"])[1] for c in cli.COMMANDS}
    assert len(set(texts.values())) == len(texts)
    assert "--shapes" in texts["sweep"] and "--shapes" not in texts["multi"]


@pytest.mark.parametrize("command, files", [
    ("sweep", {"sweep.txt", "sweep.csv", "sweep.png"}),
    ("cpu-core", {"cpu-core.txt"}),
    ("train", {"train.txt", "train.csv", "train-processes.csv", "train.png"}),
    ("multi", {"multi.txt"}),
    ("roofline", {"roofline.txt", "roofline.csv"}),
    ("linear", {"linear.txt"}),
])
def test_out_help_names_exactly_the_files_the_subcommand_writes(command, files):
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = next(a for a in sub.choices[command]._actions if "--out" in a.option_strings)
    assert set(re.findall(r"[\w<>-]+\.(?:txt|csv|png)", out.help)) == files, out.help
    assert "CSV" not in out.help and "PNG" not in out.help


@pytest.mark.parametrize("argv, named", [
    (["--shapes", "nonsense"], "resnet50.3x3.64"),
    (["sweep", "--shapes", "resnet50.3x3.64,nonsense"], "linear.4096x4096"),
    (["cpu-core", "--shapes", "nonsense"], "512x512x3x3"),
    (["--orders", "-1"], "exact"),
    (["multi", "--orders", "two"], "exact"),
    (["--dtypes", "fp8"], "bf16"),
    (["--params", "cp"], "lowrank"),
    (["--passes", "bwd"], "fwdbwd"),
    (["--backends", "gpu"], "torch"),
    (["train", "--repeats", "0"], "integer >= 1"),
    (["train", "--batch", "0"], "integer >= 1"),
    (["train", "--seq", "-3"], "integer >= 1"),
])
def test_bad_values_are_errors_naming_the_valid_ones(capsys, argv, named):
    code, _, err = _exit(capsys, argv)
    assert code == 2
    assert argv[-1].split(",")[-1] in err and named in err


@pytest.mark.parametrize("argv", [
    ["cpu-core", "--quick", "--device", "cpu"],   # cpu-core runs on the CPU only
    ["cpu-core", "--orders", "1"],
    ["multi", "--shapes", "resnet50.3x3.64"],
    ["train", "--params", "tucker"],
    ["multi", "--memory"],
])
def test_flags_a_subcommand_does_not_use_are_errors(capsys, argv):
    code, _, err = _exit(capsys, argv)
    flag = next(x for x in argv[1:] if x.startswith("--") and x != "--quick")
    assert code == 2 and f"unrecognized arguments: {flag}" in err
    assert err.startswith(f"usage: python -m lie_kernels.bench {argv[0]}")
    takes = err.split(f"{argv[0]} takes ")[1]  # names the flags it does take
    assert "--out" in takes and flag not in takes


def test_no_subcommand_means_sweep():
    a = cli.parse(["--shapes", "all", "--orders", "1,exact", "--quick"])
    assert a.command == "sweep" and a.shapes == ["all"] and a.orders == [1, None]
    assert cli.parse([]).command == "sweep"


def test_quick_sweep_times_a_few_points_without_compile(monkeypatch, capsys, tmp_path):
    """--quick is a smoke test: a few points and no torch.compile (whose compilation
    alone took minutes), unless flags say otherwise; the full default is unchanged."""
    monkeypatch.setattr(measure, "EFFORT", dict(measure.EFFORT))  # --quick lowers it
    calls = []
    monkeypatch.setattr(sweep, "run", lambda *a: calls.append(a) or ([], []))
    monkeypatch.setattr(sweep, "write_csv", lambda *a: None)
    monkeypatch.setattr(sweep, "plot", lambda *a: None)
    for argv in (["--quick"], ["--quick", "--compile"], []):
        cli.main(argv + ["--device", "cpu", "--out", str(tmp_path)])
    points = [len(c[1]) * len(c[2]) * len(c[3]) * len(c[4]) * len(c[5]) for c in calls]
    assert points == [8, 8, 30]
    assert [c[7] for c in calls] == [False, True, True]  # with_compile
    assert capsys.readouterr().out.count("torch.compile(reference) skipped") == 1


def test_quick_cpu_core_skips_compile(monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "EFFORT", dict(measure.EFFORT))
    calls = []
    monkeypatch.setattr(cpu_core, "run", lambda log, **kw: calls.append(kw))
    cli.main(["cpu-core", "--quick", "--out", str(tmp_path)])
    assert calls == [dict(shapes=cpu_core.NAMES[-1:], with_compile=False, with_memory=True)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_an_error(capsys):
    code, _, err = _exit(capsys, ["multi", "--device", "cuda"])
    assert code == 2 and "no CUDA device" in err


def test_timing_reports_min_and_median_and_warns_on_spread():
    t = measure.time_ms(lambda: sum(range(1000)), "cpu", reps=5)
    assert 0 < t.min <= t.median and t.reps >= 3
    calm = {"a": measure.Timing(1.0, 1.1, 5), "b": measure.Timing(2.0, 2.2, 5)}
    assert measure.busy_warning(calm, "cpu") is None
    busy = dict(calm, c=measure.Timing(1.0, 1.9, 5))
    warning = measure.busy_warning(busy, "cpu")
    assert "1 of 3" in warning and "1.90" in warning and "c" in warning


_REUSED_HEAP = """
import torch

import lie_kernels as lk
from lie_kernels.bench import measure
for n in (256, 512, 1024, 2048, 1024, 512, 256, 1024):  # like a timing pass over other shapes
    blocks = [torch.ones(n, n) for _ in range(6)]
    del blocks  # glibc keeps these freed blocks resident for reuse
def two_tensors():
    x = torch.ones(1024, 1024)
    y = x * 2
    return y.sum()
print([measure.peak_mib(two_tensors, "cpu") for _ in range(3)])
"""


def test_cpu_peak_memory_sees_reused_heap_blocks():
    """After a timing pass, freed heap blocks are resident and reused: the old probe (the
    resident high-water mark) read 0.0 there. The allocator-event count sees each call's
    two 4 MiB tensors. Fresh process: glibc's state must not depend on earlier tests."""
    out = subprocess.run([sys.executable, "-c", _REUSED_HEAP], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(peaks) == 3 and all(8.0 <= p < 8.1 for p in peaks), peaks


@pytest.mark.slow
def test_sweep_writes_table_legend_csv_and_plot(tmp_path):
    out = _run("--shapes", "resnet50.3x3.64", "--orders", "1,4", "--params",
               "tucker,lowrank", "--quick", "--compile", "--out", str(tmp_path))
    assert "copy bandwidth" in out and "skipped triton" in out
    assert out.count("# legend:") == 1
    for name, _ in sweep.LEGEND:
        assert f"#   {name}:" in out
    with open(tmp_path / "sweep.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == sweep.COLUMNS
        rows = list(reader)
    methods = {r["method"] for r in rows}
    assert methods == {"lie_kernels[torch]", "eager reference", "torch.compile(reference)",
                       "PEFT HiRA formula"}
    w_mib = 64 * 64 * 9 * 4 / 2 ** 20
    for r in rows:
        assert 0 < float(r["ms_min"]) <= float(r["ms_median"]) and float(r["GB/s"]) > 0
        assert float(r["x_vs_compile"]) > 0  # torch.compile(reference) measured on CPU
        assert float(r["peak_MiB"]) > 0
        if r["method"] == "eager reference" and r["order"] == "4":
            assert float(r["peak_MiB"]) >= w_mib  # it builds W-sized temporaries
    ours = [r for r in rows if r["method"] == "lie_kernels[torch]"]
    assert len(ours) == 4 and all(float(r["x_vs_eager"]) > 0 for r in ours)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep.txt").read_text() == out


@pytest.mark.slow
def test_quick_sweep_is_a_smoke_test(tmp_path):
    """`--quick` alone: a few points, no torch.compile, and the output says so."""
    out = _run("--quick", "--out", str(tmp_path))
    assert "torch.compile(reference) skipped" in out
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["case"], r["param"], r["order"]) for r in rows}) <= 8
    assert "torch.compile(reference)" not in {r["method"] for r in rows}


def _row(case, order, method, ms, spread=1.0):
    return dict(case=case, param="lowrank", order=order, dtype="fp32", method=method,
                ms_min=ms, ms_median=ms * spread, peak_MiB=ms + 1.0, **{"pass": "fwdbwd"})


#: two points whose ratios span 0.005x to 10x (once crowded the axis); one noisy timing
_ROWS = [_row("resnet50.3x3.256", 1, "lie_kernels[torch]", 0.005),
         _row("resnet50.3x3.256", 1, "eager reference", 1.0),
         _row("resnet50.3x3.256", 1, "PEFT HiRA formula", 0.5),
         _row("linear.4096x4096", "exact", "lie_kernels[torch]", 10.0, spread=2.0),
         _row("linear.4096x4096", "exact", "eager reference", 1.0)]
_RUN = "2026-01-02 03:04 UTC, cpu (Xeon, 2 threads), torch 2.x"


def _drawn_text(fig):
    """Every text the PNG shows (an axis keeps spare ticks out of view: not those)."""
    from matplotlib.text import Text
    fig.draw_without_rendering()  # lays out ticks and text
    in_view = {}
    for axis in (axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)):
        lo, hi = sorted(axis.get_view_interval())
        for tick in axis.majorTicks + axis.minorTicks:
            in_view[id(tick.label1)] = lo <= tick.get_loc() <= hi
    return [t for t in dict.fromkeys(fig.findobj(Text)) if in_view.get(id(t), True)
            and t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("quick", [True, False])
def test_sweep_plot_carries_mode_caveats_and_legend(quick):
    """The PNG travels without the table: it says what run it is, repeats the run's
    warnings and explains its rows and names; a noisy bar is hatched."""
    warning = measure.busy_warning({"a": measure.Timing(1.0, 1.0, 3),
                                    "b": measure.Timing(1.0, 2.0, 3)}, "cpu")
    fig = sweep.figure(_ROWS, _RUN, quick, [warning])
    text = " ".join(" ".join(t.get_text() for t in _drawn_text(fig)).split())
    assert "noisy timings: 1 of 2 have median/min > 1.3" in text and _RUN in text
    assert ("QUICK run" in text) == quick and ("full run" in text) != quick
    assert ("--quick: a smoke test, not a measurement" in text) == quick
    for needle in ("rows: <case> <param> o=<order> <dtype> <pass>",
                   "o= : the order K of the series exp_K", "fwdbwd = build W' and backprop",
                   "resnet50.3x3.256 = a 3x3 conv of ResNet-50",
                   "lie_kernels[<backend>] = this library's fused op on that backend (torch:",
                   "eager reference = the naive formula", "hatched = a noisy timing"):
        assert needle in text
    time_panel = fig.axes[0]
    assert [p.get_hatch() for p in time_panel.patches if p.get_hatch()] == ["////"]


def test_sweep_plot_text_does_not_overlap():
    """Tick labels (once "0.005x0.01x"), the 1x label, the title and the legend each
    stand clear of every other text."""
    fig = sweep.figure(_ROWS, _RUN, True, ["# WARNING: noisy timings: 1 of 2 ..."])
    boxes = [(t.get_text(), t.get_window_extent()) for t in _drawn_text(fig)]
    clashes = [(a, b) for i, (a, x) in enumerate(boxes) for b, y in boxes[i + 1:]
               if x.overlaps(y)]
    assert not clashes


@pytest.mark.slow
def test_bad_shapes_write_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lie_kernels.bench", "--shapes", "nonsense",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "nonsense" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cpu_core_quick(tmp_path):
    out = _run("cpu-core", "--quick", "--no-compile", "--out", str(tmp_path))
    assert "lie_kernels[torch]" in out and "eager reference" in out and "# legend:" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(cpu_core.NAMES[-1])]
    assert len(lines) == 1 and not any(ln.startswith(cpu_core.NAMES[0]) for ln in
                                       out.splitlines())


@pytest.mark.slow
def test_multi_and_train_subcommands(tmp_path):
    for cmd, needle in (("multi", "grouped_med"), ("train", "LieRA order=exact")):
        out = _run(cmd, "--quick", "--out", str(tmp_path))
        assert needle in out
    assert "# legend:" in (tmp_path / "multi.txt").read_text()


def _fake_fresh(monkeypatch, fake):
    """``train._fresh`` answering from ``fake[(model, method)]``, the i-th call of a pair
    getting its i-th (ms, peak) (None: that process fails); returns the calls made."""
    from lie_kernels.bench import train
    calls = []

    def fresh(model, method, device, rank, s):
        calls.append((model, method))
        got = fake[(model, method)][calls.count((model, method)) - 1]
        if got is None:
            return dict(model=model, method=method, error="boom")
        return dict(model=model, method=method, targets=1, trainable=1, ms=got[0],
                    peak_mib=got[1])
    monkeypatch.setattr(train, "_fresh", fresh)
    return calls


def test_train_rows_are_medians_over_rounds_and_ratios_are_paired(monkeypatch):
    """With ``repeats`` 3 every (model, method) runs once per round, so drift hits all
    alike (``train.round_order``); a row is the median step time and peak over its
    processes, with the peaks' range; its ratio to PEFT LoRA is the median over rounds of
    the two measured in the same round (not the ratio of the medians), and one failed
    process fails the row."""
    from lie_kernels.bench import train
    calls = _fake_fresh(monkeypatch, {
        ("m", "PEFT LoRA"): [(10, 100), (30, 90), (20, 140)],
        ("m", "LieRA order=1"): [(13, 100), (33, 120), (21, 141)],
        ("m", "LieRA order=4"): [(1, 1), None, (1, 1)],
        ("n", "PEFT LoRA"): [(5, 5)] * 3, ("n", "LieRA order=1"): [(5, 5)] * 3,
        ("n", "LieRA order=4"): [(5, 5)] * 3})
    methods = ["PEFT LoRA", "LieRA order=1", "LieRA order=4"]
    rows = train.run("cpu", log=lambda *_: None, models=["m", "n", "m"],
                     methods=methods + ["PEFT LoRA"], repeats=3)  # a repeated name: one row
    # method by method, each round reversing the last: a pair's neighbours are the
    # same method on the other models
    one = [(m, meth) for meth in methods for m in "mn"]
    assert calls == one + one[::-1] + one
    lora, lie, failed = rows[:3]
    assert (lora["ms"], lora["peak_mib"], lora["peak_min"], lora["peak_max"],
            lora["runs"]) == (20, 100, 90, 140, 3)
    assert (lie["ms"], lie["peak_mib"]) == (21, 120)
    # rounds: 13/10, 33/30, 21/20 and 100/100, 120/90, 141/140
    assert lie["time_vs_lora"] == 1.1 and lie["mem_vs_lora"] == 141 / 140
    assert failed["error"] == "boom" and "time_vs_lora" not in failed
    assert all("time_vs_dense" not in r and "time_vs_hira" not in r for r in rows)


def test_train_quantized_rows_compare_with_peft_hira_and_the_dense_model(monkeypatch):
    """A quantized model's row is also compared, round by round, with PEFT HiRA on the
    same base and with the same method on the unquantized model (the QLoRA targets); a
    reference that failed or is not in the run gives no ratio."""
    from lie_kernels.bench import train
    dense, nf4, int8 = "llama-all", "llama-all-nf4", "llama-all-int8"
    _fake_fresh(monkeypatch, {
        (dense, "PEFT LoRA"): [(10, 50)] * 2, (dense, "PEFT HiRA"): [(20, 80)] * 2,
        (dense, "LieRA order=1"): [(12, 52), (24, 52)],
        (nf4, "PEFT LoRA"): [(11, 50)] * 2, (nf4, "PEFT HiRA"): [(20, 100), (40, 100)],
        (nf4, "LieRA order=1"): [(13, 54), (26, 54)],
        (int8, "PEFT LoRA"): [(11, 50)] * 2, (int8, "PEFT HiRA"): [None, (1, 1)],
        (int8, "LieRA order=1"): [(13, 54)] * 2})
    lines = []
    rows = train.run("cpu", log=lines.append, models=[dense, nf4, int8],
                     methods=["PEFT LoRA", "PEFT HiRA", "LieRA order=1"], repeats=2)
    by = {(r["model"], r["method"]): r for r in rows}
    q = by[(nf4, "LieRA order=1")]
    assert (q["time_vs_hira"], q["mem_vs_hira"]) == (0.65, 0.54)
    assert q["time_vs_dense"] == pytest.approx(13 / 12) and q["mem_vs_dense"] == 54 / 52
    assert by[(nf4, "PEFT HiRA")]["time_vs_dense"] == 1.5
    assert "time_vs_dense" not in by[(dense, "LieRA order=1")]
    assert "time_vs_hira" not in by[(int8, "LieRA order=1")]  # its PEFT HiRA failed
    assert "time_vs_dense" in by[(int8, "LieRA order=1")]
    assert "time/HiRA" in lines[-len(rows) - 1] and "time/dense" in lines[-len(rows) - 1]


def test_train_batch_and_seq_reach_every_process(monkeypatch, tmp_path, capsys):
    """``--batch``/``--seq`` replace the setting's own in every fresh process and in the
    table's header (the issue's Llama rows are batch 4 x 128 tokens)."""
    from lie_kernels.bench import __main__ as cli, train
    seen = []
    monkeypatch.setattr(train, "_fresh", lambda m, meth, d, r, s: seen.append(dict(s)) or
                        dict(model=m, method=meth, targets=1, trainable=1, ms=1.0,
                             peak_mib=1.0))
    cli.main(["train", "--models", "llama-all", "--methods", "lora,liera1", "--batch", "4",
              "--seq", "128", "--repeats", "2", "--out", str(tmp_path)])
    assert len(seen) == 4 and "batch 4 x 128 tokens" in capsys.readouterr().out
    assert all((s["batch"], s["seq"], s["repeats"]) == (4, 128, 2) for s in seen)
    with open(tmp_path / "train-processes.csv") as f:  # one line a process, by round
        procs = list(csv.DictReader(f))
    assert [(p["round"], p["method"]) for p in procs] == [
        ("0", "PEFT LoRA"), ("1", "PEFT LoRA"), ("0", "LieRA order=1"), ("1", "LieRA order=1")]


@pytest.mark.parametrize("model, layer, flag", [("llama-all-nf4", "Linear4bit", "4bit"),
                                                ("llama-all-int8", "Linear8bitLt", "8bit")])
def test_train_quantized_llama_keeps_lm_head_and_embeddings_dense(model, layer, flag):
    """Every decoder linear layer is a quantized bitsandbytes one (the flag tells PEFT to
    use its bitsandbytes layers); lm_head and the embeddings stay dense."""
    bnb = pytest.importorskip("bitsandbytes")
    from lie_kernels.bench import train
    m, _, _, targets = train.build(model, 1, 32, 8, "cpu")
    decoder = [mod for mod in m.model.layers.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(decoder) == len(targets) == 28
    assert all(type(mod) is getattr(bnb.nn, layer) for mod in decoder)
    assert all(m.get_submodule(t).weight.dtype in (torch.uint8, torch.int8) for t in targets)
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight.dtype == torch.float32
    assert getattr(m, f"is_loaded_in_{flag}") is True


@pytest.mark.slow
def test_train_quantized_models_run_every_method_but_full_fine_tune(tmp_path):
    """Quick `train` on the nf4 and int8 Llama: each model's rows are the adapter methods
    asked for, measured, with ratios to PEFT LoRA on it; full fine-tuning is not run on a
    quantized base, and the output says so."""
    pytest.importorskip("bitsandbytes")
    out = _run("train", "--quick", "--models", "llama-all-nf4,llama-all-int8",
               "--methods", "lora,liera-exact,full", "--out", str(tmp_path), timeout=600)
    assert "full fine-tune: not run on llama-all-nf4, llama-all-int8" in out
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, meth) for m in ("llama-all-nf4", "llama-all-int8")
        for meth in ("PEFT LoRA", "LieRA order=exact")]
    assert all(not r["error"] and float(r["peak_mib"]) > 0 and r["mem_vs_lora"]
               for r in rows)


@pytest.mark.slow
def test_linear_says_what_it_needs_without_a_gpu(tmp_path):
    """`linear` times the fused Linear backward on a GPU; here it says why it measured
    nothing (and still writes its file), rather than timing the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the device check runs `linear` for real")
    out = _run("linear", "--quick", "--out", str(tmp_path))
    assert "needs a CUDA device" in out and "nothing measured" in out
    assert "needs a CUDA device" in (tmp_path / "linear.txt").read_text()


def test_linear_measures_the_fused_and_the_unfused_backward(monkeypatch):
    """What `linear` times on a GPU, run here in the Triton interpreter at a tiny size:
    "fused" launches the fused Linear backward, "unfused" does not."""
    from lie_kernels.backends import get_backend, triton_backend
    from lie_kernels.bench import linear_bwd
    usable, why = lk.available_backends().get("triton", (False, "not registered"))
    if not usable:
        pytest.skip(f"triton unusable here: {why}")
    be = get_backend("triton")
    launches, real = [], triton_backend.kernels.lie_linear_bwd_kernel

    class Spy:  # records, per launch, whether the unfused override was in place
        def __getitem__(self, grid):
            launches.append("linear_backward" in vars(be))
            return real[grid]
    monkeypatch.setattr(triton_backend.kernels, "lie_linear_bwd_kernel", Spy())
    monkeypatch.setitem(measure.EFFORT, "warmup", 0)
    monkeypatch.setitem(measure.EFFORT, "max_reps", 1)
    from lie_kernels.ops import layer as layer_ops
    monkeypatch.setattr(layer_ops, "FUSE_MIN_NUMEL", 0)  # the GPU shapes are far above it
    default, formed = triton_backend.Backend.linear_backward, []
    monkeypatch.setattr(triton_backend.Backend, "linear_backward",
                        lambda self, *a: (formed.append(1), default(self, *a))[1])
    row = linear_bwd.measure_shape(24, 40, 8, torch.float16, 4, "cpu", be)
    assert launches and not any(launches)  # fused steps launched it, unfused ones never
    assert formed  # the unfused steps formed dL/dW' (the base class's linear_backward)
    assert "linear_backward" not in vars(be)  # the override is gone afterwards
    assert row["fused_ms"] > 0 and row["unfused_ms"] > 0


def test_linear_table_formats_what_a_gpu_run_returns(monkeypatch):
    """The GPU-only table and legend of `linear`, fed a made-up measurement (its numbers
    come from the roofline and from that row; no GPU here to produce real ones)."""
    from lie_kernels.bench import linear_bwd
    monkeypatch.setattr(linear_bwd, "get_backend", lambda name: None)
    monkeypatch.setattr(linear_bwd, "measure_shape", lambda c_out, c_in, *a: dict(
        shape=f"{c_out}x{c_in}", fused_ms=1.0, unfused_ms=1.25, speedup=1.25,
        fused_MiB=10.0, unfused_MiB=42.0))
    lines = []
    rows = linear_bwd.run("cuda", lines.append, quick=True)
    assert len(rows) == 1 and rows[0]["saving_us"] == 250.0 and rows[0]["pred_us"] > 0
    table = "\n".join(lines)
    assert "4096x4096" in table and "250.0" in table and "# saving_us, pred_us:" in table
