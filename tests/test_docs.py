"""The ```python blocks of the README run, in order, in one namespace."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "README.md"


def test_integration_docs_run(monkeypatch):
    pytest.importorskip("peft", reason="the PEFT sections need peft (pip install peft)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the blocks set it too; restore it afterwards
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[python block {i}]", "exec"), namespace)
