"""Reading compiled kernels: resources and SASS features of a cubin, one report row per
kernel configuration, and the gate's verdict on a row (``check_row``). The tools are the
``cuobjdump``/``nvdisasm`` that ship inside the Triton wheel.

Row schema (one dict per kernel configuration, made by ``triton_aot`` and ``cuda_report``):

    kernel       str   e.g. "triton fwd", "triton bwd", "cuda fwd"
    arch         int   80 / 90
    dtype        str   "fp32" | "fp16" | "bf16"  (W's dtype)
    order        str   "0".."8" | "exact"
    rank_pad     int   the rank tile (16..128)
    num_warps    int   warps per block (threads = 32 × num_warps)
    regs         int   registers per thread
    stack_bytes  int   local-memory stack frame per thread
    spill        bool  any STL/LDL in the SASS (register spills)
    smem_bytes   int   shared memory per block (static + what the launch asks)
    blocks_per_sm int  resident blocks per SM allowed by regs, threads and smem
    ldg128       bool  128-bit global loads (LDG.E.128) present
    stg128       bool  128-bit global stores (STG.E.128) present
    mma          bool  tensor-core instructions (HMMA/HGMMA) present
    red          bool  hardware global atomics (RED/ATOM) present
    contract     str   what this kernel must show: "ldg128 stg128 mma red" (any subset)

The SASS helpers (``tool``, ``resource_usage``, ``sass``, ``sass_features``,
``blocks_per_sm``, ``cubin_row``, ``check_row``) work on any cubin or nvcc object.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional

#: per-SM budget (sm_80 and sm_90 alike for what we check): registers, threads, blocks
SM_REGS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32
SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
#: the gate's limits: no kernel may take more, or keep fewer blocks resident
MAX_SMEM_PER_BLOCK = 64 * 1024
MIN_BLOCKS_PER_SM = 2


def tool(name: str) -> str:
    """Path of ``cuobjdump``/``nvdisasm`` shipped with the Triton wheel."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return path


def _with_file(cubin, fn):
    """Run ``fn(path)`` on a cubin given as bytes or as a path."""
    if isinstance(cubin, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return fn(f.name)
    return fn(os.fspath(cubin))


def resource_usage(cubin) -> Dict[str, Dict[str, int]]:
    """``{function: {"regs", "stack", "smem"}}`` from ``cuobjdump --dump-resource-usage``."""
    out = _with_file(cubin, lambda p: subprocess.run(
        [tool("cuobjdump"), "--dump-resource-usage", p], check=True, capture_output=True,
        text=True).stdout)
    funcs, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            get = lambda key: int(re.search(rf"\b{key}:(\d+)", line).group(1))  # noqa: E731
            funcs[name] = dict(regs=get("REG"), stack=get("STACK"), smem=get("SHARED"))
    return funcs


def sass(cubin) -> str:
    """The SASS text of a cubin (``cuobjdump -sass``)."""
    return _with_file(cubin, lambda p: subprocess.run(
        [tool("cuobjdump"), "-sass", p], check=True, capture_output=True, text=True).stdout)


def sass_features(text: str) -> Dict[str, bool]:
    """Spills (STL/LDL), 128-bit global loads/stores, tensor-core MMA and hardware
    global atomics in SASS text."""
    return dict(spill=bool(re.search(r"\b(STL|LDL)\b", text)),
                ldg128=bool(re.search(r"\bLDG\.E[.\w]*\.128\b", text)),
                stg128=bool(re.search(r"\bSTG\.E[.\w]*\.128\b", text)),
                mma=bool(re.search(r"\b(HMMA|HGMMA|IMMA)\b", text)),
                red=bool(re.search(r"\b(REDG?|ATOMG?)\.E\b", text)))


def blocks_per_sm(regs: int, threads: int, smem: int, arch: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of
    256), threads and shared memory."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = [SM_REGS // (regs_per_warp * warps), SM_THREADS // threads, SM_BLOCKS]
    if smem:
        limits.append(SM_SMEM[arch] // smem)
    return min(limits)


def cubin_row(cubin, *, kernel: str, arch: int, dtype: str, order: str, rank_pad: int,
              num_warps: int, contract: str, launch_smem: int = 0,
              function: Optional[str] = None) -> dict:
    """One report row for a compiled kernel (``launch_smem``: the dynamic shared
    memory the launch requests, e.g. Triton's ``metadata.shared``)."""
    usage = resource_usage(cubin)
    fn = function or next(iter(usage))
    u = usage[fn]
    smem = max(u["smem"], launch_smem)
    feats = sass_features(sass(cubin))
    return dict(kernel=kernel, arch=arch, dtype=dtype, order=order, rank_pad=rank_pad,
                num_warps=num_warps, regs=u["regs"], stack_bytes=u["stack"],
                spill=feats["spill"], smem_bytes=smem,
                blocks_per_sm=blocks_per_sm(u["regs"], 32 * num_warps, smem, arch),
                ldg128=feats["ldg128"], stg128=feats["stg128"], mma=feats["mma"],
                red=feats["red"], contract=contract)


def check_row(row: dict) -> List[str]:
    """What a row breaks of the gate (empty = healthy)."""
    bad = []
    if row["spill"] or row["stack_bytes"]:
        bad.append(f"spills (stack {row['stack_bytes']} B)")
    if row["smem_bytes"] > MAX_SMEM_PER_BLOCK:
        bad.append(f"shared memory {row['smem_bytes']} B > {MAX_SMEM_PER_BLOCK}")
    if row["blocks_per_sm"] < MIN_BLOCKS_PER_SM:
        bad.append(f"{row['blocks_per_sm']} block(s)/SM < {MIN_BLOCKS_PER_SM}")
    for feat in row["contract"].split():
        if not row[feat]:
            bad.append(f"no {feat}")
    return bad


COLUMNS = ("kernel", "arch", "dtype", "order", "rank_pad", "num_warps", "regs", "stack_bytes",
           "spill", "smem_bytes", "blocks_per_sm", "ldg128", "stg128", "mma", "red", "contract")
#: columns only quantized-W rows have (``triton_aot``: the width of the loads of W's
#: stored bytes, and whether it is the widest the tile allows); shown when a row has them
QUANTIZED_COLUMNS = ("w_load_bits", "ldg_w")


def _cell(value) -> str:
    return ("yes" if value else "-") if isinstance(value, bool) else str(value)


def format_table(rows: Iterable[dict]) -> str:
    """Markdown table of rows, with the gate's verdict per row (and, when any row has
    them, the ``QUANTIZED_COLUMNS`` after it: empty on the other rows)."""
    rows = list(rows)
    extra = [c for c in QUANTIZED_COLUMNS if any(c in r for r in rows)]
    head = [*COLUMNS, "gate", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r[c]) for c in COLUMNS] + ["; ".join(check_row(r)) or "ok"]
        cells += [_cell(r[c]) if c in r else "" for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
