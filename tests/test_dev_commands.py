"""The Makefile's commands run what the README says they run (``make -n``: printed, not run)."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: run under ``make test ARGS=...``, the outer make's variables reach an inner make through
#: MAKEFLAGS: the inner one must see only what each test passes
ENV = {k: v for k, v in os.environ.items()
       if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS")}
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _pytest_args(target: str, args: str = "") -> list:
    """The arguments ``make <target>`` would pass to pytest (the install step is skipped:
    ``make -n`` only prints, and the stamp rule's lines are not pytest's)."""
    out = subprocess.run(["make", "-n", target] + ([f"ARGS={args}"] if args else []),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if " -m pytest" in x)
    return shlex.split(line.split(" -m pytest", 1)[1])


def test_make_test_with_named_tests_runs_exactly_those():
    assert _pytest_args("test", "-x -q tests/test_math.py") == ["-x", "-q", "tests/test_math.py"]


def test_make_test_without_paths_runs_the_whole_suite():
    """No path given: pytest runs its configured testpaths, the tests/ folder."""
    assert _pytest_args("test") == []
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()


def test_make_test_fast_skips_only_slow_tests():
    assert _pytest_args("test-fast", "-q") == ["-m", "not slow", "-q"]


def test_lint_and_gate_commands():
    lint = subprocess.run(["make", "-n", "lint"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          check=True).stdout
    assert "ruff check" in lint
    gate = subprocess.run(["make", "-n", "gate"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          check=True).stdout
    assert "-m dev.kernel_report 80 90" in gate
