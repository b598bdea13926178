"""Test set-up: the kernel runs through Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before triton decorates the kernel, so it is set
here, before anything imports the package. Tests of the torch CPU path switch it
off per test with the ``cpu_path`` fixture; the backend is chosen at each step.

Tests marked ``gpu`` (``pytest -m gpu``, run by ``perf/gpu_check.py``) run on a GPU:
``@gpu`` ones need CUDA; ``@gpu_or_cpu`` ones run on ``device_under_test()``
(``TRITON_ADADELTA_TEST_DEVICE``, default ``cuda``), which ``cpu`` points at the
interpreter so that their plumbing is checked without a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a GPU machine may lack it: the tests that need no hypothesis still run
    settings = None
if settings is not None:
    _QUIET = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    # CI: bounded and derandomized, so a run is repeatable and fits the time limit.
    settings.register_profile("ci", max_examples=40, derandomize=True, **_QUIET)
    # For long runs: HYPOTHESIS_PROFILE=thorough make test
    settings.register_profile("thorough", max_examples=1000, **_QUIET)
    # The GPU check's CPU plumbing run (perf/gpu_check.py --tiny): a few examples each.
    settings.register_profile("smoke", max_examples=3, derandomize=True, **_QUIET)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _patch_language_once_per_launch() -> None:
    """Speed up the interpreter: patch ``triton.language`` once per kernel launch.

    Under ``TRITON_INTERPRET=1`` each launch patches ``triton.language`` for the
    interpreter, and then every nested ``@triton.jit`` call patches it again, about
    38% of an interpreted step's time in ``cProfile``. A nested call whose language
    modules this launch has already patched gets the same patch, so it is skipped here.
    Calls that need a module the launch has not patched (``tl.rand``'s ``tl.core``,
    the first time) still patch, as before. Only the tests' interpreter runs change:
    the same kernel source runs on the same interpreter builder.
    """
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original_patch is None or executor is None or getattr(original_patch, "_once_per_launch", False):
        return
    # One entry per launch in progress: the ids of the language modules it has patched.
    launches: list[set[int]] = []

    class _NothingToRestore:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        modules = {id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)}
        if launches and launches[-1] and modules <= launches[-1]:
            return _NothingToRestore()
        scope = original_patch(fn)
        if launches:
            launches[-1] |= modules
        return scope

    original_call = executor.__call__

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return original_call(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang._once_per_launch = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device_under_test() -> torch.device:
    """The device of the ``@gpu_or_cpu`` tests: ``$TRITON_ADADELTA_TEST_DEVICE``, default ``cuda``."""
    return torch.device(os.environ.get("TRITON_ADADELTA_TEST_DEVICE", "cuda"))


def gpu(test):
    """A ``gpu`` test that needs CUDA (a CUDA or ROCm device); skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not has_gpu(), reason="needs a CUDA or ROCm device")(test))


def gpu_or_cpu(test):
    """A ``gpu`` test that runs on ``device_under_test()``; skipped where that device is absent."""
    device = device_under_test()
    absent = device.type == "cuda" and not has_gpu()
    return pytest.mark.gpu(pytest.mark.skipif(absent, reason="needs a CUDA or ROCm device")(test))


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


@pytest.fixture(scope="session", autouse=True)
def _native_reader_built():
    """Build the native param reader before the first test (it is built in the
    background at first use), so that every test steps through the same path."""
    from triton_adadelta.reader import param_reader

    param_reader(wait=True)


def _c_loop_built_with(flags: tuple[str, ...], export: str, as_built: int, skip_reason: str) -> object:
    """The C loop built with extra compiler ``flags``, where this machine's own build
    has the int ``export`` at ``as_built`` (else the tests as built ran that variant:
    skip with ``skip_reason``)."""
    import ctypes

    from triton_adadelta import cpu

    try:
        built = cpu._build_native_library()
        if ctypes.c_int.in_dll(built, export).value != as_built:
            pytest.skip(skip_reason)
        return cpu._build_native_library(flags)
    except cpu.BuildError as error:
        pytest.skip(f"no C loop here: {error}")


@pytest.fixture(scope="session")
def library_8_lanes():
    """The C loop built without AVX-512, where this machine's build has it: the 8-lane
    compressed-state loops that CPUs without AVX-512 run (and this one, for uint8
    state, under flush-to-zero)."""
    import ctypes

    library = _c_loop_built_with(
        ("-mno-avx512f",), "adadelta_u8_lanes", 16,
        "this machine's build has no 16-lane loop: the tests as built ran the 8-lane one",
    )  # fmt: skip
    assert ctypes.c_int.in_dll(library, "adadelta_u8_lanes").value == 8
    return library


@pytest.fixture(scope="session")
def library_16_lanes_packs():
    """The C loop built without AVX512_VBMI, where this machine's build has it: the
    16-lane uint8 encoder's other gather of its codes (packs and a permute), which
    AVX-512 CPUs without VBMI run."""
    import ctypes

    library = _c_loop_built_with(
        ("-mno-avx512vbmi",), "adadelta_u8_byte_permute", 1,
        "this machine's build has no byte-permute gather: the tests as built ran the packs",
    )  # fmt: skip
    assert ctypes.c_int.in_dll(library, "adadelta_u8_byte_permute").value == 0
    assert ctypes.c_int.in_dll(library, "adadelta_u8_lanes").value == 16
    return library


def pytest_collection_modifyitems(config, items):
    """Skip the CUDA runs of the ``gpu`` tests under the interpreter: ``TRITON_INTERPRET=1``
    (set above unless the caller set it) runs the kernel on the host, which cannot reach
    the GPU's params (it crashed the process). ``make gpu-check`` sets ``TRITON_INTERPRET=0``;
    ``make test`` on a GPU machine runs the rest."""
    if not (device_under_test().type == "cuda" and has_gpu() and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    skip = pytest.mark.skip(
        reason="TRITON_INTERPRET=1 cannot reach CUDA params: run the gpu tests with TRITON_INTERPRET=0 (make gpu-check)"
    )
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
