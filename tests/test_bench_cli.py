"""The benchmark CLI explains itself: per-subcommand help, errors for bad input, legends,
unambiguous method names, min and median, meaningful CPU memory; and it runs end to end."""
import argparse
import ast
import csv
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


def test_sweep_writes_table_legend_csv_and_plot(tmp_path):
    out = _run("--shapes", "resnet50.3x3.64", "--orders", "1,4", "--params",
               "tucker,lowrank", "--quick", "--out", str(tmp_path))
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


def test_bad_shapes_write_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lie_kernels.bench", "--shapes", "nonsense",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "nonsense" in out.stderr
    assert not (tmp_path / "o").exists()


def test_cpu_core_quick(tmp_path):
    out = _run("cpu-core", "--quick", "--no-compile", "--out", str(tmp_path))
    assert "lie_kernels[torch]" in out and "eager reference" in out and "# legend:" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(cpu_core.NAMES[-1])]
    assert len(lines) == 1 and not any(ln.startswith(cpu_core.NAMES[0]) for ln in
                                       out.splitlines())


def test_multi_and_train_subcommands(tmp_path):
    for cmd, needle in (("multi", "grouped_med"), ("train", "LieRA order=exact")):
        out = _run(cmd, "--quick", "--out", str(tmp_path))
        assert needle in out
    assert "# legend:" in (tmp_path / "multi.txt").read_text()


def test_train_rows_are_medians_over_interleaved_processes(monkeypatch):
    """With ``repeats`` 3 every method of a model runs once per round (so drift hits all
    alike); a row is the median step time and peak over its processes, with the peaks'
    range, and one failed process fails the row."""
    from lie_kernels.bench import train
    calls, fake = [], {("m", "PEFT LoRA"): [(10, 100), (30, 90), (20, 140)],
                       ("m", "LieRA order=1"): [(13, 100), (11, 120), (12, 101)],
                       ("m", "LieRA order=4"): [(1, 1), None, (1, 1)]}

    def fresh(model, method, device, rank, s):
        calls.append(method)
        got = fake[(model, method)][sum(c == method for c in calls) - 1]
        if got is None:
            return dict(model=model, method=method, error="boom")
        return dict(model=model, method=method, targets=1, trainable=1, ms=got[0],
                    peak_mib=got[1])
    monkeypatch.setattr(train, "_fresh", fresh)
    methods = ["PEFT LoRA", "LieRA order=1", "LieRA order=4"]
    rows = train.run("cpu", log=lambda *_: None, models=["m", "m"],
                     methods=methods + ["PEFT LoRA"], repeats=3)  # a repeated name: one row
    assert calls == methods * 3
    lora, lie, failed = rows
    assert (lora["ms"], lora["peak_mib"], lora["peak_min"], lora["peak_max"],
            lora["runs"]) == (20, 100, 90, 140, 3)
    assert (lie["ms"], lie["peak_mib"]) == (12, 101)
    assert lie["time_vs_lora"] == 12 / 20 and lie["mem_vs_lora"] == 101 / 100
    assert failed["error"] == "boom" and "time_vs_lora" not in failed


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
    launches, real = [], triton_backend.K.lie_linear_bwd_kernel

    class Spy:  # records, per launch, whether the unfused override was in place
        def __getitem__(self, grid):
            launches.append("linear_backward" in vars(be))
            return real[grid]
    monkeypatch.setattr(triton_backend.K, "lie_linear_bwd_kernel", Spy())
    monkeypatch.setitem(measure.EFFORT, "warmup", 0)
    monkeypatch.setitem(measure.EFFORT, "max_reps", 1)
    from lie_kernels import layer_ops
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
