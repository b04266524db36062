"""Every ```python block of the README runs on its own, as a reader pasting it would."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_is_self_contained(monkeypatch, tmp_path, index):
    code = BLOCKS[index]
    if "peft" in code:
        pytest.importorskip("peft", reason="this block needs peft (pip install peft)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block may set it: restore it afterwards
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"{DOC.name}[python block {index}]", "exec"), {"__name__": "__main__"})
