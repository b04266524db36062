"""Static health rows of the ``csrc/`` kernels, in ``dev/sass.py``'s schema.

``rows(archs)`` compiles the torch-free kernels with nvcc for those archs (cached
in ``<LIE_KERNELS_BUILD_DIR>/report_sm<archs>/``; about 15 s per arch on 2 cores),
splits the fat object into one cubin per arch (``cuobjdump -xelf``) and reads each
kernel instance's registers, stack and static shared memory
(``--dump-resource-usage``) and its SASS (``-sass``) with the tools that ship in
the Triton wheel. One row per instance: fwd and bwd for 3 dtypes x 10 orders,
plus the small finish kernel (sums the backward's partials) per dtype.

Every instance is built for ``kMaxRank`` = 32 (``rank_pad``): shared memory and the
register accumulators are sized for it, and the rank loops stop at the real rank.
``mma`` is not in the contract: the CUDA kernels contract the rank on FMA units
(see docs/cuda.md for the roofline argument); they are the reference
implementation, ranked below Triton in ``auto``.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, List

from lie_kernels import cuda_build

from dev import sass

THREADS = 256  # csrc/lie_kernels.cu: kThreads
RANK_PAD = 32  # csrc/lie_launch.h: kMaxRank
DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
#: what each kernel must show in SASS; finish sums small fp32 partials, scalar is fine
CONTRACTS = {"fwd": "ldg128 stg128", "bwd": "ldg128 stg128", "finish": ""}
_NAME = re.compile(r"(fwd|bwd|finish)_kernelI(f|6__half|13__nv_bfloat16)(?:L(in?)(\d+)E)?")


def instance(mangled: str):
    """``(kernel, dtype, order)`` of a mangled csrc kernel name, or None for others."""
    m = _NAME.search(mangled)
    if m is None:
        return None
    kind, dtype, sign, num = m.groups()
    order = "-" if num is None else "exact" if sign == "in" else num
    return kind, DTYPES[dtype], order


def split_sass(text: str) -> Dict[str, str]:
    """``{function: its SASS}`` for one cubin's ``cuobjdump -sass`` text."""
    parts = re.split(r"\n\s*Function : (\S+)", text)
    return dict(zip(parts[1::2], parts[2::2]))


def object_for(archs: Iterable[int]) -> Path:
    """The nvcc object of the kernels for ``archs``, compiled unless cached and fresh."""
    archs = sorted(set(archs))
    out = cuda_build.build_dir() / ("report_sm" + "_".join(map(str, archs)))
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "lie_kernels.o"
    if not obj.exists() or obj.stat().st_mtime < cuda_build.sources_mtime():
        obj = cuda_build.compile_kernels(out, archs)
    return obj


def cubins(obj: Path, workdir: Path) -> Dict[int, Path]:
    """``{arch: cubin}`` extracted from a fat nvcc object."""
    subprocess.run([sass.tool("cuobjdump"), "-xelf", "all", str(obj)], cwd=workdir, check=True,
                   capture_output=True)
    found = {}
    for f in workdir.glob("*.cubin"):
        m = re.search(r"sm_(\d+)", f.name)
        if m:
            found[int(m.group(1))] = f
    return found


def rows_from_object(obj: Path) -> List[dict]:
    """One row per csrc kernel instance and arch found in ``obj``."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cubin in sorted(cubins(obj, Path(tmp)).items()):
            usage, code = sass.resource_usage(cubin), split_sass(sass.sass(cubin))
            for fn, u in sorted(usage.items()):
                inst = instance(fn)
                if inst is None:
                    continue
                kind, dtype, order = inst
                feats = sass.sass_features(code.get(fn, ""))
                out.append(dict(
                    kernel=f"cuda {kind}", arch=arch, dtype=dtype, order=order,
                    rank_pad=RANK_PAD, num_warps=THREADS // 32, regs=u["regs"],
                    stack_bytes=u["stack"], spill=feats["spill"], smem_bytes=u["smem"],
                    blocks_per_sm=sass.blocks_per_sm(u["regs"], THREADS, u["smem"], arch),
                    ldg128=feats["ldg128"], stg128=feats["stg128"], mma=feats["mma"],
                    red=feats["red"],
                    contract=CONTRACTS[kind]))
    return out


def rows(archs: Iterable[int]) -> List[dict]:
    """Rows for every csrc kernel instance on ``archs`` (empty, with a warning, when
    nvcc is missing: the CUDA rows then cannot be produced on this machine)."""
    if cuda_build.cuda_home() is None:
        warnings.warn("nvcc not found: no rows for the CUDA kernels (set CUDA_HOME)")
        return []
    return rows_from_object(object_for(archs))
