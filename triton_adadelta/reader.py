"""Read every param's and grad's address in one native pass (the step's fixed cost).

Each step, :meth:`FlatState.plan <triton_adadelta.flat.FlatState.plan>` must know
every param's and grad's data pointer, and that each grad can update its param as
it is (contiguous, its param's dtype, device and size). Through Python that is one
attribute read per tensor and property, about 1 us a param on the 2-core machine
we measure on: on 1000 small params it was most of a step. ``csrc/read_params.cpp``
does the same reads through ATen's public C++ API in one pass: a steady step's plan
on 1000 params took 70 us with it, 435-541 us without (``perf/bench_step.py``, in
``perf/results/reader_ab/``).

It is compiled once per machine against the installed torch's own headers (so its
ABI is that torch's), at first use, by a process of its own that a background thread
waits for, since the compile takes 15-20 s: steps taken meanwhile read through
Python, with the same result, and a process that exits first leaves the build to
finish and be cached for the next one. With ``TRITON_ADADELTA_NATIVE_READER=0``, or
where it cannot be built (no C++ compiler, no Python headers: one warning says why),
every step reads through Python.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import subprocess
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from .native_build import BuildError, NotBuilt, load_cached, wait_for_awaited_builds

__all__ = [
    "READ_IRREGULAR", "READ_NEW_GRADS", "READ_NEW_PARAMS", "READ_SAME", "GradZeroer", "ParamReader", "grad_zeroer",
    "param_reader", "reader_status", "record_function",
]  # fmt: skip

# (params, out, with versions, table, piece bytes, param row, grad row, aligned row)
# -> one of these (pointers as ints; see csrc/read_params.cpp):
ParamReader = Callable[[list[torch.Tensor], int, int, int, int, int, int, int], int]
READ_SAME = 0  # the addresses the buffer held already
READ_NEW_GRADS = 1  # other grad addresses, the same params'
READ_NEW_PARAMS = 2  # other param addresses
READ_IRREGULAR = 3  # and up (or negative): a step for the Python reads
# (params, set_to_none) -> 0 done, else nothing changed and torch's own path must run.
GradZeroer = Callable[[list[torch.Tensor], int], int]

_SOURCE = Path(__file__).parent / "csrc" / "read_params.cpp"

# The compile against torch's headers took 16.3-19.2 s on the 2-core machine we test on
# (perf/bench_step.py); it runs in the background, so the bound can be generous.
_BUILD_TIMEOUT_S = 90.0

_lock = threading.Lock()
_builder: threading.Thread | None = None
_reader: ParamReader | None = None
_zeroer: GradZeroer | None = None
_record_enter: Callable[[bytes], int | None] | None = None
_record_exit: Callable[[int], None] | None = None
_failure: str | None = None
# Set once the build thread has started the compile's own process, or has ended: a
# process that exits before then waits for it at exit (see _build_detached).
_compile_started = threading.Event()
# How long an exiting process waits for that: the cache key's inputs (torch's
# include paths) and the cache check, under a second here.
_EXIT_WAIT_S = 30.0


def _flags() -> list[str]:
    """Compile and link against this torch and this Python, as torch's own
    ``cpp_extension`` does."""
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", "-w"]
    flags += [f"-I{path}" for path in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    for path in library_paths():
        flags += [f"-L{path}", f"-Wl,-rpath,{path}"]
    return flags + ["-lc10", "-ltorch_cpu", "-ltorch_python"]


def _abi_key() -> str:
    """What the binary's ABI depends on besides its source and flags."""
    return " ".join([torch.__version__, str(torch.version.git_version), sys.version, sysconfig.get_platform()])


def _load(*, cache_only: bool) -> ctypes.PyDLL:
    # PyDLL: the function holds the GIL, as it reads Python objects.
    return load_cached(
        "read_params", _SOURCE, language="c++", flags=_flags(), key_extra=_abi_key(), loader=ctypes.PyDLL,
        timeout_s=_BUILD_TIMEOUT_S, cache_only=cache_only, symbols=(
            "triton_adadelta_read_params", "triton_adadelta_zero_grads", "triton_adadelta_record_enter",
            "triton_adadelta_record_exit",
        ),
    )  # fmt: skip


def _build_detached() -> None:
    """Compile in a process of its own session, which finishes and caches the library
    even when this one exits first (a short script, a test run): else every short
    process would start a compile and kill it at exit, and none would get the reader."""
    code = (
        f"import sys; sys.path[:0] = {sys.path!r}\n"
        "from triton_adadelta import reader\n"
        "try:\n    reader._load(cache_only=False)\n"
        "except Exception as error:\n    sys.exit(str(error))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    _compile_started.set()
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise BuildError(stderr.decode(errors="replace").strip() or f"the build process exited with {process.returncode}")


def _build() -> None:
    try:
        _build_and_load()
    finally:
        _compile_started.set()


def _build_and_load() -> None:
    global _reader, _zeroer, _record_enter, _record_exit, _failure
    try:
        try:
            library = _load(cache_only=True)
        except NotBuilt:
            # The CPU path's loop, if the first step is building it, goes first.
            wait_for_awaited_builds(_BUILD_TIMEOUT_S)
            _build_detached()
            library = _load(cache_only=True)
        function = library.triton_adadelta_read_params
        function.restype = ctypes.c_int64
        function.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        function.argtypes += [ctypes.c_int64] * 3
        zeroer = library.triton_adadelta_zero_grads
        zeroer.restype = ctypes.c_int64
        zeroer.argtypes = [ctypes.py_object, ctypes.c_int64]
        enter, leave = library.triton_adadelta_record_enter, library.triton_adadelta_record_exit
        enter.restype, enter.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        leave.restype, leave.argtypes = None, [ctypes.c_void_p]
        _zeroer, _record_enter, _record_exit = zeroer, enter, leave
        _reader = function
    except (BuildError, AttributeError, OSError) as error:
        _failure = str(error)
        warnings.warn(
            f"triton_adadelta: steps read params and grads through Python (slower on many small params): {error}",
            RuntimeWarning,
            stacklevel=2,
        )


@torch.compiler.disable
def param_reader(*, wait: bool = False) -> ParamReader | None:
    """The native reader, or None while it is being built or where it cannot be.

    The first call starts the build in a background thread.

    Args:
        wait: block until the build has finished (tests and benchmarks, which must
            know which path they time).
    """
    global _builder
    if _reader is not None:
        return _reader
    if os.environ.get("TRITON_ADADELTA_NATIVE_READER", "1") == "0" or _failure is not None:
        return None
    with _lock:
        if _builder is None:
            _builder = threading.Thread(target=_build, name="triton_adadelta reader build", daemon=True)
            _builder.start()
            atexit.register(_wait_for_the_compile_to_start)
    if wait:
        _builder.join()
    return _reader


def _wait_for_the_compile_to_start() -> None:
    """At exit, let the build thread start the compile's process if it has not yet (a
    daemon thread dies with the interpreter): a script that exits right after its
    first step still leaves the library to be built and cached for the next one."""
    if _builder is not None and _builder.is_alive():
        _compile_started.wait(_EXIT_WAIT_S)


def grad_zeroer() -> GradZeroer | None:
    """The native ``zero_grad`` of ``csrc/read_params.cpp`` once the reader's library
    is loaded (it never starts or waits for the build), else None."""
    return _zeroer


class record_function:
    """``torch.autograd.profiler.record_function(name)``, at one C call's cost where
    no profiler or observer is listening (``csrc/read_params.cpp``).

    torch's Python context manager builds a scripted object through the dispatcher
    at every entry, observed or not. Under compilation, or before the reader's
    library is loaded, this is torch's own context manager.
    """

    __slots__ = ("_name", "_encoded", "_record", "_torch")

    def __init__(self, name: str) -> None:
        self._name = name
        self._encoded = name.encode()  # (outlives the record)
        self._record: int | None = None
        self._torch: torch.autograd.profiler.record_function | None = None

    def __enter__(self) -> None:
        if _record_enter is None or torch.compiler.is_compiling():
            self._torch = torch.autograd.profiler.record_function(self._name)
            self._torch.__enter__()
        else:
            self._record = _record_enter(self._encoded)

    def __exit__(self, *exc_info: object) -> None:
        if self._torch is not None:
            self._torch.__exit__(*exc_info)
        elif self._record and _record_exit is not None:
            _record_exit(self._record)


def reader_status() -> str:
    """``"native"``, ``"building"``, ``"off"`` (by the environment) or why it failed."""
    if _reader is not None:
        return "native"
    if os.environ.get("TRITON_ADADELTA_NATIVE_READER", "1") == "0":
        return "off"
    if _failure is not None:
        return f"failed: {_failure}"
    return "building" if _builder is not None else "not started"
