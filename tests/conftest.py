"""Test set-up: the kernel runs through Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before triton decorates the kernel, so it is set
here, before anything imports the package. Tests of the torch CPU path switch it
off per test with the ``cpu_path`` fixture; the backend is chosen at each step.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI: bounded and derandomized, so a run is repeatable and fits the time limit.
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# For long runs: HYPOTHESIS_PROFILE=thorough make test
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_gpu() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not has_gpu(), reason="needs a CUDA or ROCm device")


@pytest.fixture(params=["triton-interpreter", "torch"])
def backend(request, monkeypatch):
    """Run a test once on the Triton kernel (interpreter) and once on the torch CPU path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton-interpreter" else "0")
    return request.param


@pytest.fixture
def cpu_path(monkeypatch):
    """Run a test on the torch CPU path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return "torch"
