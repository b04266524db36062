"""Shared test setup.

Without a GPU, the Triton backend runs under the Triton interpreter on CPU
tensors, so the same backend-parametrized tests exercise it here. The variable
must be set before triton is imported, hence at conftest import time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import lie_kernels as lk  # noqa: E402  (after the environment is set)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Hypothesis: a bounded "ci" profile by default; `pytest --slow` selects "slow" (deep fuzzing).
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ = dict(deadline=None, derandomize=True, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, **_FUZZ)
settings.register_profile("slow", max_examples=2000, **{**_FUZZ, "derandomize": False})


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="deep runs: hypothesis profile 'slow' (thousands of fuzz examples), "
                          "20 fresh processes for the thread-safety test")


def pytest_configure(config):
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


def backend_cases():
    """``(backend, device)`` for every registered backend on every device here.

    A backend that cannot run here is still listed, as a skip that says why,
    so a missing GPU shows up in the report instead of vanishing.
    """
    cases = []
    for name, (usable, why) in lk.available_backends().items():
        for dev in DEVICES if name == "torch" else ["cuda" if HAS_CUDA else "cpu"]:
            marks = ([] if usable else
                     [pytest.mark.skip(reason=f"{name} backend unusable here: {why}")])
            cases.append(pytest.param(name, dev, id=f"{name}-{dev}", marks=marks))
    return cases


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
