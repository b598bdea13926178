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


@pytest.fixture(params=["compiled", "python"])
def change_check(request, monkeypatch):
    """Notice param changes with the compiled watch, then with the Python checks."""
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1" if request.param == "compiled" else "0")
    if request.param == "compiled":
        require_watch_library()
    return request.param


def require_watch_library():
    """The compiled watch; skips where there is no C++ compiler, fails where it does not build."""
    from triton_adadelta.native_build import find_compiler
    from triton_adadelta.watch import watch_library

    if find_compiler("c++") is None:
        pytest.skip("no C++ compiler: the compiled change watch cannot be built")
    library = watch_library()
    assert library is not None, "a C++ compiler is present but the change watch did not build"
    return library
