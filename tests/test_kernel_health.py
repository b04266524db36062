"""Static kernel health gate, no GPU needed.

Compiles every kernel configuration the Triton backend can launch for sm_90 and
sm_80 exactly as the runtime JIT specialises it (``triton_aot``: unit strides
constexpr 1, ``tt.divisibility`` 16 on pointers and sizes, the backend's own tile
shapes, warps and stages), reads each cubin with the ``cuobjdump`` that ships
with Triton (``dev/sass.py``) and asserts, per configuration:
no spills or stack, <= 64 KB shared memory per block, registers × threads that
leave room for >= 2 blocks per SM, 128-bit global loads/stores on the
contiguous paths, and tensor-core MMA wherever a 16-bit rank contraction runs.
The CUDA backend's rows (``dev/cuda_report.py``) are checked the same way.

Coverage and cost: see ``triton_aot``'s docstring (every order at rank pad 16 and
every rank pad at the heaviest orders on sm_90, the corners on sm_80). ``python -m
dev.kernel_report`` (``make gate``) prints the same table.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # compiles ~550 kernels for sm_80/sm_90: about 8 minutes on 2 cores

from dev import sass, triton_aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dev.kernel_report", "--json", "80", "90"],
                          env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_triton_configuration_compiles(rows):
    triton_rows = [r for r in rows if r["kernel"].startswith("triton")]
    assert len(triton_rows) == len(list(triton_aot.cases(80))) + len(list(triton_aot.cases(90)))


def test_triton_kernels_pass_the_gate(rows):
    bad = [f"sm_{r['arch']} {r['kernel']} {r['dtype']} order={r['order']} "
           f"rank_pad={r['rank_pad']}: {'; '.join(sass.check_row(r))}"
           for r in rows if r["kernel"].startswith("triton") and sass.check_row(r)]
    assert not bad, "\n".join(bad)


def test_cuda_kernels_pass_the_gate(rows):
    cuda_rows = [r for r in rows if not r["kernel"].startswith("triton")]
    assert cuda_rows, "cuda_report gave no rows"
    bad = [f"{r}: {sass.check_row(r)}" for r in cuda_rows if sass.check_row(r)]
    assert not bad, "\n".join(bad)


def test_the_gate_sees_a_spill():
    """The SASS reader finds what the gate checks (a made-up SASS excerpt)."""
    feats = sass.sass_features(
        "        /*0100*/  STL.64 [R1+0x8], R4 ;\n        /*0110*/  HMMA.16816.F32.BF16 R8, R12 ;"
        "\n        /*0120*/  LDG.E.128 R4, desc[UR4][R2.64] ;"
        "\n        /*0130*/  REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;")
    assert feats == dict(spill=True, ldg128=True, stg128=False, mma=True, red=True)
    assert not sass.sass_features("  STG.E.128 [R2], R4 ;")["red"]
    assert sass.blocks_per_sm(255, 256, 0, 90) == 1
    assert sass.blocks_per_sm(128, 256, 0, 90) == 2


def test_roofline_counts_what_the_kernels_move(tmp_path):
    """The roofline's bytes follow the backend's launch shapes: never below the floor,
    the backward's scratch sized by its real split counts (deterministic) or its two
    accumulators (atomic), and a CSV per run."""
    from lie_kernels.backends.triton_backend import bwd_plan
    from lie_kernels.backends.triton_configs import config
    from lie_kernels.bench import roofline
    fwd = roofline.predict(4096, 4096, 16, "bf16", 1, "fwd")
    det = roofline.predict(4096, 4096, 16, "bf16", 1, "bwd-det")
    assert fwd["floor_bytes"] == 2 * 4096 * 4096 * 2 < fwd["bytes"]
    plan = bwd_plan(4096, 4096, config("bwd", "bf16", 16), atomic=False)
    assert det["partial_bytes"] == 4 * 16 * (plan.col_splits * 4096 + plan.row_splits * 4096)
    assert det["time_us"] >= det["t_mem_us"] > det["floor_us"]
    rows = roofline.run(str(tmp_path), log=lambda s: None)
    assert (tmp_path / "roofline.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.parametrize("rank", [16, 32, 64, 128])
def test_atomic_backward_scratch_and_bytes_at_4096(rank):
    """The backward's targets for a 4096x4096 bf16 W, by the roofline's count of the
    default (atomic) backward: scratch <= W/8 at every rank <= 128, bytes <= 1.25x
    the floor at ranks <= 64, two launches."""
    from lie_kernels.bench import roofline
    bwd = roofline.predict(4096, 4096, rank, "bf16", 1, "bwd")
    assert bwd["partial_bytes"] == 4 * rank * 8192 <= 4096 * 4096 * 2 / 8
    assert bwd["launches"] == 2
    if rank <= 64:
        assert bwd["bytes_x_floor"] <= 1.25


def test_roofline_of_the_fused_linear_backward():
    """The fused Linear backward moves exactly dL/dW' less (written by the GEMM, read by
    the Lie backward: 2·C_out·C_in·e bytes) and is predicted faster by that much or more."""
    from lie_kernels.bench import roofline
    fused, unfused = (roofline.predict_linear_grad(4096, 11008, 8192, 16, "bf16", f)
                      for f in (True, False))
    assert unfused["bytes"] - fused["bytes"] == 2 * 4096 * 11008 * 2
    assert unfused["flops"] == fused["flops"] and unfused["time_us"] > fused["time_us"]
