"""The benchmark CLI runs end to end on a tiny case and writes its table, CSV and plot."""
import csv
import subprocess
import sys


def test_sweep_writes_table_csv_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lie_kernels.bench", "--shapes", "resnet50.3x3.64",
         "--orders", "1,exact", "--params", "tucker,lowrank", "--quick", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "copy bandwidth" in out.stdout and "skipped triton" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    methods = {r["method"] for r in rows}
    assert {"torch", "eager", "hira"} <= methods
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["GB/s"]) > 0
    ours = [r for r in rows if r["method"] == "torch"]
    assert len(ours) == 4 and all(float(r["x_vs_eager"]) > 0 for r in ours)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep.txt").read_text().startswith("# ")


def test_multi_and_train_subcommands(tmp_path):
    for cmd, needle in (("multi", "grouped ms"), ("train", "LieRA order=exact")):
        out = subprocess.run([sys.executable, "-m", "lie_kernels.bench", cmd, "--quick",
                              "--out", str(tmp_path)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert needle in out.stdout
