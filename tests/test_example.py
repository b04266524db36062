"""examples/digits_finetune.py --quick: produces its table, CSV and plot; LieRA learns."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn", reason="the example needs scikit-learn (pip install scikit-learn)")
pytest.importorskip("matplotlib", reason="the example plots with matplotlib")


@pytest.mark.slow
def test_digits_example_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/digits_finetune.py"), "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| LieRA exact |" in proc.stdout
    assert (tmp_path / "results.png").stat().st_size > 0
    with open(tmp_path / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    chance = 1 / 5
    for name in ("LieRA order 1", "LieRA order 4", "LieRA exact"):
        assert float(rows[name]["accuracy"]) > chance + 0.4, rows[name]
        # the adapter trains far fewer parameters than the full model
        assert int(rows[name]["trainable"]) < int(rows["full fine-tune"]["trainable"]) / 5
