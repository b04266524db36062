"""Build the CUDA extension (``csrc/``) when the package was installed without it.

``python -m lie_kernels.cuda_build`` (or ``build()``) compiles the torch-free
kernels with nvcc (``-Xptxas -v``: the register/spill report is saved beside the
object), then JIT-links the torch binding with ``torch.utils.cpp_extension.load``.
Everything lands in ``LIE_KERNELS_BUILD_DIR`` (default ``~/.cache/lie_kernels``)
and is reused. Needs a CUDA build of torch and nvcc; no GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

CSRC = Path(__file__).resolve().parent.parent / "csrc"
EXT_NAME = "lie_kernels_cuda_ext"
KERNEL_SOURCES = ("lie_kernels.cu", "lie_series.cuh", "lie_launch.h")  # the nvcc object


def build_dir() -> Path:
    d = Path(os.environ.get("LIE_KERNELS_BUILD_DIR",
                            Path.home() / ".cache" / "lie_kernels")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def cuda_home() -> Optional[str]:
    """CUDA_HOME, or the toolkit behind ``nvcc`` on PATH (it may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    text = Path(nvcc).read_bytes()[:4096].decode("latin-1")
    m = re.search(r"exec\s+(\S+/bin/nvcc)", text)  # a wrapper names the real binary
    real = Path(m.group(1) if m else os.path.realpath(nvcc))
    return str(real.parent.parent)


def host_flags() -> List[str]:
    """C++ flags for the torch binding. The pip CUDA headers (cusparse.h, which torch's
    headers include) go after the toolkit's own (``-idirafter``): first, their partial
    runtime headers would shadow the toolkit's and miss crt/host_defines.h."""
    flags = ["-O2"]  # the C++ standard is torch's choice (its headers need C++20)
    for base in map(Path, sys.path):
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            if (base / sub).is_dir():
                flags.append(f"-idirafter{base / sub}")
    return flags


def arch_list() -> List[int]:
    """Compute capabilities to build, from TORCH_CUDA_ARCH_LIST (default 8.0;9.0)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";").split(";")
    return [int(a.replace(".", "").replace("+PTX", "")) for a in archs if a]


def arch_flags(archs: Optional[List[int]] = None) -> List[str]:
    flags = []
    for n in archs or arch_list():
        flags += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    return flags


def sources_mtime() -> float:
    """Newest modification time of the nvcc object's sources."""
    return max((CSRC / f).stat().st_mtime for f in KERNEL_SOURCES)


def compile_kernels(out_dir: Path, archs: Optional[List[int]] = None) -> Path:
    """nvcc the torch-free kernels; writes ``ptxas.txt`` (registers/spills per kernel)."""
    home = cuda_home()
    if home is None:
        raise RuntimeError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    obj = out_dir / "lie_kernels.o"
    cmd = [str(Path(home) / "bin" / "nvcc"), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
           "-Xptxas", "-v", *arch_flags(archs), "-I", str(CSRC), "-c",
           str(CSRC / "lie_kernels.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out_dir / "ptxas.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
    return obj


def spill_report(out_dir: Path) -> List[str]:
    """Kernels with local-memory use: ``"<stack line> <mangled name>"`` per offender."""
    lines = (out_dir / "ptxas.txt").read_text().splitlines()
    bad = []
    for i, line in enumerate(lines[:-1]):
        if "Function properties for" in line:
            stack = lines[i + 1].strip()
            if not stack.startswith("0 bytes stack frame, 0 bytes spill stores"):
                bad.append(f"{stack} {line.split()[-1]}")
    return bad


def built_library() -> Optional[Path]:
    """The JIT-built shared library, if a previous ``build()`` left one."""
    lib = build_dir() / f"{EXT_NAME}.so"
    return lib if lib.exists() else None


def build(verbose: bool = False) -> None:
    """Compile (once) and load the extension: its ops appear under torch.ops.lie_kernels_cuda."""
    home = cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    # torch derives -gencode flags from the visible GPU, and there may be none
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    if home:  # it reads CUDA_HOME once, at import, and takes /usr/local for a wrapper nvcc
        cpp_extension.CUDA_HOME = home
    out = build_dir()
    obj = out / "lie_kernels.o"
    if not obj.exists() or obj.stat().st_mtime < sources_mtime():
        obj = compile_kernels(out)
    cpp_extension.load(
        name=EXT_NAME, sources=[str(CSRC / "binding.cpp")], extra_include_paths=[str(CSRC)],
        extra_ldflags=[str(obj), f"-L{Path(home) / 'lib64'}", "-lcudart"],
        # the object's mtime in the flags: torch re-links only when its flags or sources change
        extra_cflags=host_flags() + [f"-DLIE_KERNELS_OBJECT_STAMP={obj.stat().st_mtime_ns}"],
        with_cuda=True, build_directory=str(out),
        is_python_module=False, verbose=verbose)  # ops only: torch.ops.lie_kernels_cuda


if __name__ == "__main__":
    build(verbose=True)
    print("built; ptxas report:", build_dir() / "ptxas.txt")
    for line in spill_report(build_dir()):
        print("LOCAL MEMORY:", line)
