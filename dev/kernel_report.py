"""Static kernel health: what the GPU compiler made of every kernel the backends can launch.

``python -m dev.kernel_report [--json] [80 90]`` (``make gate``) compiles every Triton
kernel configuration (``triton_aot``: exactly as the runtime JIT specialises it for
contiguous, 16-byte-aligned tensors) and the ``csrc/`` kernels (``cuda_report``), reads
the cubins (``sass``) and prints one row per configuration with the gate's verdict;
exit status 1 when a row fails. ``tests/test_kernel_health.py`` asserts the same rows.
"""
from __future__ import annotations

import json
import sys
from typing import List

from dev import cuda_report, triton_aot
from dev.sass import check_row, format_table


def all_rows(archs, workers: int = 2) -> List[dict]:
    """Triton rows (compiled in a pool of ``workers``) plus the CUDA kernels' rows."""
    return list(triton_aot.report_rows(archs, workers)) + list(cuda_report.rows(archs))


def main(argv=None) -> int:
    """``[--json] [arch ...]``: the table (or JSON rows); exit 1 when a row fails."""
    args = list(argv if argv is not None else sys.argv[1:])
    as_json = "--json" in args
    archs = [int(a) for a in args if a != "--json"] or [80, 90]
    rows = all_rows(archs)
    if as_json:
        print(json.dumps(rows))
        return 0
    print(format_table(rows))
    bad = sum(bool(check_row(r)) for r in rows)
    print(f"\n{len(rows)} configurations, {bad} fail the gate")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
