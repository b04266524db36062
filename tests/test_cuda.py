"""CUDA backend: what can be checked without a GPU runs here; the rest runs on one.

Here: the shared series header compiled for the host against float64; the
extension compiled with nvcc, linked against torch, loaded, its ops and fake
implementations registered; no local-memory spills in the hot kernels. On a
GPU, test_backends.py runs the "cuda" backend like every other, and the
cross-check below compares it with Triton and the float64 reference.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lie_kernels as lk
from lie_kernels import _cuda_build

from helpers import lowrank_inputs, ref_lowrank, rel_err

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()
HAS_NVCC = _cuda_build.cuda_home() is not None and torch.version.cuda is not None


def _series_ref(order, x):
    if order == -1:
        return math.exp(x), math.expm1(x), math.exp(x)
    e = sum(x ** k / math.factorial(k) for k in range(order + 1))
    de = sum(x ** k / math.factorial(k) for k in range(order)) if order > 0 else 0.0
    return e, e - 1.0, de


def test_series_header_host_build(tmp_path):
    """csrc/lie_series.cuh built by g++ for the host, every order, against float64."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) on this machine")
    exe = tmp_path / "series"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "csrc" / "series_host_test.cpp"), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = set()
    for line in lines.splitlines():
        order, x, *got = line.split()
        order, x = int(order), float(x)
        seen.add(order)
        for g, want in zip(map(float, got), _series_ref(order, x)):
            assert abs(g - want) <= 1e-6 * max(1.0, abs(want)), (order, x, g, want)
    assert seen == set(range(-1, 9))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fresh build of the extension (nvcc + JIT link) for this test module."""
    if not HAS_NVCC:
        pytest.skip("needs nvcc and a CUDA build of torch to compile the extension "
                    f"(cuda_home={_cuda_build.cuda_home()}, torch.version.cuda="
                    f"{torch.version.cuda})")
    out = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, LIE_KERNELS_BUILD_DIR=str(out), MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "-m", "lie_kernels._cuda_build"], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, env


def test_extension_links_loads_and_registers_ops(built):
    out, env = built
    assert (out / f"{_cuda_build.EXT_NAME}.so").exists()
    check = ("import torch; from lie_kernels.backends import cuda_backend as cb\n"
             "ops = cb.load(); assert ops is not None, cb._STATE\n"
             "print(ops.forward.default._schema); print(ops.backward.default._schema)\n"
             "from torch._subclasses.fake_tensor import FakeTensorMode\n"
             "with FakeTensorMode():\n"
             "    w = torch.empty(6, 5, 3, 3); u = torch.empty(6, 2); p = torch.empty(2, 45)\n"
             "    print(tuple(ops.forward(w, u, p, 1, 0.5).shape))\n"
             "    print([tuple(t.shape) for t in ops.backward(w, w, u, p, 1, 0.5, False)])\n")
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("lie_kernels_cuda::forward(Tensor weight, Tensor u, Tensor p, "
                               "int order, float scale) -> Tensor")
    assert lines[1].startswith("lie_kernels_cuda::backward(Tensor grad")
    assert lines[2] == "(6, 5, 3, 3)"
    assert lines[3] == "[(0,), (6, 2), (2, 45)]"


def test_no_local_memory_in_hot_kernels(built):
    out, _ = built
    report = (out / "ptxas.txt").read_text()
    print(report)  # the register/spill report, kept in the test log
    kernels = report.count("Function properties for")
    assert kernels >= 2 * 3 * 10 * 2  # (fwd + bwd) x 3 dtypes x 10 orders x 2 archs
    assert _cuda_build.spill_report(out) == []


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU; none on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", [0, 1, 4, None])
def test_cuda_matches_triton_and_reference(dtype, order):
    if not lk.available_backends()["cuda"][0]:
        pytest.skip(f"cuda backend unusable: {lk.available_backends()['cuda'][1]}")
    w, a, b = lowrank_inputs((300, 7, 3, 3), 13, dtype=dtype, device="cuda")
    outs = {}
    for be in ("cuda", "triton"):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = lk.lie_weight_lowrank(w, aa, bb, order=order, scale=0.5, backend=be)
        out.backward(torch.ones_like(out))
        outs[be] = (out, aa.grad, bb.grad)
    ref, (_, ra, rb) = ref_lowrank(w, a, b, order, 0.5)
    ref.backward(torch.ones_like(ref))
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    for be, (out, ga, gb) in outs.items():
        assert rel_err(out, ref) < tol, be
        assert rel_err(ga, ra.grad) < 10 * tol and rel_err(gb, rb.grad) < 10 * tol, be
    assert rel_err(outs["cuda"][0], outs["triton"][0].double()) < tol
