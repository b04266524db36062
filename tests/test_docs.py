"""The documentation works as written.

* Every ```python block of README.md and of docs/*.md runs on its own, as a reader
  pasting it would: in a fresh namespace, in a temporary directory, with
  HF_HUB_OFFLINE=1. A block that needs torchrun or a GPU is a ```text or ```bash
  block instead.
* README.md stays short (at most 220 lines).
* Every relative link in README.md, CHANGELOG.md and docs/*.md points to a file that
  exists and, when it names an anchor, to a heading of that file.
"""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
README_MAX_LINES = 220

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(text: str):
    """``(language, code, first line number)`` of every fenced code block."""
    blocks, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        blocks.append((lang, "".join(body), start + 1))
        i += 1  # the closing fence
    return blocks


def prose(text: str, code_spans: bool = False) -> str:
    """The text outside fenced code blocks, and outside inline code spans unless
    ``code_spans`` (a heading's anchor keeps the text of its code spans)."""
    out, in_fence, fence = [], False, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if not in_fence and m:
            in_fence, fence = True, m.group(1)
            continue
        if in_fence:
            s = line.strip()
            if s.startswith(fence[0] * len(fence)) and s.strip(fence[0]) == "":
                in_fence = False
            continue
        out.append(line if code_spans else re.sub(r"(`+).*?\1", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in prose(path.read_text(), code_spans=True).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path):
    """Targets of the markdown links and images of ``path`` that are not URLs."""
    text = prose(path.read_text())
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I)]


PYTHON_BLOCKS = [(page, code, line) for page in [README, *DOCS]
                 for lang, code, line in fenced_blocks(page.read_text()) if lang == "python"]


def test_pages_exist():
    assert README.exists() and (ROOT / "CHANGELOG.md").exists()
    assert len(DOCS) >= 7, [_rel(p) for p in DOCS]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [_rel(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_docs_have_python_blocks():
    pages = {page for page, _, _ in PYTHON_BLOCKS}
    assert README in pages
    assert len(PYTHON_BLOCKS) >= 8


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(page)}: broken links:\n" + "\n".join(broken)


REPO_PATH = re.compile(r"^(?:lie_kernels|tests|dev|bench|csrc|examples|docs|\.ci)/[\w./{},-]*"
                       r"(?:::\w+)?$")
IGNORED = ("bench/results/local", "examples/results")  # git-ignored outputs of a run


def _expand(path: str):
    """``a.{txt,csv}`` -> ``a.txt``, ``a.csv``."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in _expand(path[:m.start()] + alt + path[m.end():])]


def repo_paths(page: Path):
    """Repository paths named in the inline code of ``page``, e.g. `lie_kernels/ops/layer.py`
    or `tests/test_x.py::test_y`."""
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(page.read_text(), code_spans=True))
    return sorted({s for s in spans if REPO_PATH.match(s) and not s.startswith(IGNORED)})


@pytest.mark.parametrize("page", [README, *DOCS], ids=_rel)
def test_named_repository_paths_exist(page):
    """Files, folders and test functions the docs name exist (CHANGELOG.md names old
    paths on purpose and is not checked)."""
    missing = []
    for name in repo_paths(page):
        path, _, func = name.partition("::")
        for p in _expand(path):
            if not (ROOT / p).exists():
                missing.append(f"{name}: no {p}")
            elif func and not re.search(rf"^\s*def {func}\b", (ROOT / p).read_text(), re.M):
                missing.append(f"{name}: no function {func} in {p}")
    assert not missing, f"{_rel(page)} names what does not exist:\n" + "\n".join(missing)


def test_slug_matches_github():
    assert slug("`torch`: the CPU path") == "torch-the-cpu-path"
    assert slug("Back to plain layers: `unload`") == "back-to-plain-layers-unload"
    assert slug("PEFT: LieRA itself") == "peft-liera-itself"
    assert slug("Why FMA units; why below Triton (roofline)") == \
        "why-fma-units-why-below-triton-roofline"
    assert slug("state_dict layout") == "state_dict-layout"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)),
                         ids=[f"{_rel(p)}:{line}" for p, _, line in PYTHON_BLOCKS])
def test_python_block_is_self_contained(monkeypatch, tmp_path, index):
    page, code, line = PYTHON_BLOCKS[index]
    if re.search(r"^\s*(import|from)\s+peft\b", code, flags=re.M):
        pytest.importorskip("peft", reason="this block needs peft (pip install peft)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block may set it: restore it afterwards
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    # line numbers in tracebacks match the page
    source = "\n" * (line - 1) + code
    exec(compile(source, f"{_rel(page)}[python block at line {line}]", "exec"),
         {"__name__": "__main__"})
