"""The package's shape: imports run one way, development tools stay outside, private names
stay private, and the order encoding and the kernel tile table each have one definition."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: import layers, top to bottom: a module may import its own layer or a lower one only
LAYERS = [
    ("bench", "integrations"),
    ("nn",),
    ("functional",),
    ("ops",),
    ("backends",),
    ("series", "tucker", "cuda_build"),
    ("validation", "reference", "order", "quant"),
]


def _modules(package: str):
    """``{dotted name: path}`` of every module of a package under the repository root."""
    base = ROOT / package
    return {".".join((package, *p.relative_to(base).with_suffix("").parts)): p
            for p in sorted(base.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")[:-1]  # a package's __init__ is in the package itself
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules):
    """``{module: {(imported module, imported name or None, lineno)}}``, at any depth
    (function-level imports count too), project modules only."""
    out = {}
    for mod, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(a.name, None, node.lineno) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                found |= {(target, a.name, node.lineno) for a in node.names}
        out[mod.removesuffix(".__init__")] = {
            f for f in found if f[0].split(".")[0] in ("lie_kernels", "dev")}
    return out


def _target(imported: str, name, known) -> str:
    """The module an import binds: ``from pkg import mod`` binds the submodule."""
    return f"{imported}.{name}" if name and f"{imported}.{name}" in known else imported


def _graph(modules):
    known = {m.removesuffix(".__init__") for m in modules}
    return {m: {_target(i, n, known) for i, n, _ in deps} - {m}
            for m, deps in _imports(modules).items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d, stack + [d])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def _layer(module: str):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root re-exports the public API
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: place it")


@pytest.mark.parametrize("package", ["lie_kernels", "dev"])
def test_import_graph_has_no_cycle(package):
    graph = _graph(_modules(package))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_imports_run_down_the_layers():
    """integrations → nn → functional → ops → backends → kernels/series →
    validation/reference, never back up (the package root and ``__main__`` excepted)."""
    up = []
    for mod, deps in _graph(_modules("lie_kernels")).items():
        here = _layer(mod)
        for dep in deps:
            there = _layer(dep) if dep.startswith("lie_kernels") else None
            if here is not None and there is not None and there < here:
                up.append(f"{mod} imports {dep}")
    assert not up, "\n".join(up)


def test_runtime_package_never_imports_the_dev_tools():
    bad = [f"{m} imports {i}" for m, deps in _imports(_modules("lie_kernels")).items()
           for i, _, _ in deps if i.split(".")[0] == "dev"]
    assert not bad, bad
    assert not (ROOT / "lie_kernels" / "kernel_report.py").exists()


def test_no_private_name_imported_across_modules():
    bad = []
    for package in ("lie_kernels", "dev"):
        for mod, deps in _imports(_modules(package)).items():
            for imported, name, line in deps:
                parts = imported.split(".") + ([name] if name else [])
                private = [p for p in parts if p.startswith("_") and not p.startswith("__")]
                if private:
                    bad.append(f"{mod}:{line} imports {'.'.join(parts)}")
    assert not bad, "\n".join(bad)


def _definitions(pattern: str):
    rx = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(ROOT)) for pkg in ("lie_kernels", "dev")
                  for p in (ROOT / pkg).rglob("*.py") if rx.search(p.read_text()))


def test_one_definition_of_the_order_encoding():
    assert _definitions(r"^\s*EXACT\s*=") == ["lie_kernels/order.py"]
    assert _definitions(r"^\s*MAX_ORDER\s*=") == ["lie_kernels/order.py"]
    assert _definitions(r"def (encode|decode)_order") == ["lie_kernels/order.py"]
    # no hand-written conversions between None and -1 anywhere else
    assert _definitions(r"None if \w+ == -1|-1 if \w+ is None") == []


def test_one_definition_of_the_kernel_tiles():
    """The tile table is ``triton_configs``: the backend and the gate read it, nothing else
    builds a GPU tile config (the interpreter's own big tiles excepted)."""
    assert _definitions(r"def (fwd|bwd|linear_bwd|grouped)_config") == []
    assert "config(" in (ROOT / "dev" / "triton_aot.py").read_text()
    built = _definitions(r"\bC\(\d+, \d+")
    assert built == ["lie_kernels/backends/triton_configs.py"]


def test_cuda_order_constants_match_python():
    """``csrc/lie_series.cuh`` spells the exact exp and the unrolled bound like Python."""
    from lie_kernels.backends.base import KERNEL_MAX_ORDER
    from lie_kernels.order import EXACT
    header = (ROOT / "csrc" / "lie_series.cuh").read_text()
    assert int(re.search(r"kExact = (-?\d+);", header).group(1)) == EXACT
    assert int(re.search(r"kMaxOrder = (\d+);", header).group(1)) == KERNEL_MAX_ORDER


def test_kernel_signatures_are_derived_from_the_kernels():
    """The gate compiles each kernel with a signature read off its parameter list: every
    parameter typed, pointers by role, unit strides as the JIT specialises them."""
    pytest.importorskip("triton")
    from dev import triton_aot
    from lie_kernels.backends import triton_kernels as k
    sig = triton_aot.signature(k.lie_linear_bwd_kernel, "bf16", "fp32", {"ORDER": 1})
    assert list(sig) == k.lie_linear_bwd_kernel.arg_names
    assert (sig["gy_ptr"], sig["u_ptr"], sig["du_acc_ptr"], sig["scale"], sig["N"]) == (
        "*bf16", "*fp32", "*fp32", "fp32", "i32")
    assert triton_aot.unit_strides(k.lie_linear_bwd_kernel) == (
        "s_gr", "s_xc", "s_wc", "s_uk", "s_pc", "s_dc")
    assert triton_aot.unit_strides(k.lie_fwd_kernel) == ("s_wc", "s_uk", "s_pc", "s_oc")
