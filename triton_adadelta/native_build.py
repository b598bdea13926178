"""Compile a small native library once per machine, and cache it on disk.

The CPU path's fused loop (:mod:`triton_adadelta.cpu`, from ``csrc/adadelta_cpu.c``)
is built this way. A library is keyed on everything that decides its code (source,
flags, compiler, machine, and what the caller adds, such as the CPU model), so a
cached one is reused only where it is valid. Where nothing can be built (no
compiler, no headers, a compiler error), :func:`build_cached` raises
:class:`BuildError` saying why, and the caller falls back to Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

Library = TypeVar("Library", bound=ctypes.CDLL)

__all__ = ["BuildError", "build_cached", "cache_dir", "cpu_model", "find_compiler", "load_cached"]

# How much of a failed compiler's stderr a BuildError keeps: the first error and its
# context, not pages of follow-on errors.
_STDERR_TAIL_CHARS = 2000


class BuildError(RuntimeError):
    """A native library could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """``$TRITON_ADADELTA_CACHE_DIR``, else ``~/.cache/triton_adadelta``."""
    root = os.environ.get("TRITON_ADADELTA_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "triton_adadelta"


def cpu_model() -> str:
    """What ``-march=native`` may use on this machine (part of a cache key)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "".join(line for line in cpuinfo if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor()


def find_compiler(language: str) -> str | None:
    """The system compiler for ``"c"`` (``$CC``) or ``"c++"`` (``$CXX``), or None."""
    if language == "c":
        return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = (text or "").strip()
    return text if len(text) <= _STDERR_TAIL_CHARS else "..." + text[-_STDERR_TAIL_CHARS:]


def build_cached(name: str, source: Path, *, language: str, flags: list[str], key_extra: str = "") -> Path:
    """Compile the source file ``source`` into a shared library, or find it in the cache.

    Args:
        name: file name stem of the library.
        source: the C or C++ source file (its text is part of the cache key).
        language: ``"c"`` or ``"c++"``.
        flags: compiler and linker flags (``-o`` is added here).
        key_extra: anything else the binary depends on (a CPU model, a torch version).

    Returns:
        The library's path.

    Raises:
        BuildError: no compiler, an unreadable source, or a failed compile (with the
            tail of the compiler's stderr).
    """
    compiler = find_compiler(language)
    if compiler is None:
        raise BuildError(f"no {language} compiler found (set {'CC' if language == 'c' else 'CXX'} or install one)")
    try:
        text = source.read_text()
    except OSError as error:
        raise BuildError(f"cannot read {source}: {error}") from error
    key = hashlib.sha256("\0".join([text, " ".join(flags), compiler, platform.machine(), key_extra]).encode())
    path = cache_dir() / f"{name}_{key.hexdigest()[:24]}.so"
    if path.exists():
        return path
    # How the build is named in an error: the output file is a temporary one.
    described = " ".join([compiler, str(source), *flags])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as build_dir:
            built = Path(build_dir) / path.name
            command = [compiler, str(source), "-o", str(built), *flags]
            subprocess.run(command, check=True, capture_output=True, timeout=300)
            # Atomic: a concurrent process sees no library or a whole one.
            os.replace(built, path)
    except subprocess.CalledProcessError as error:
        raise BuildError(f"`{described}` failed with exit code {error.returncode}:\n{_tail(error.stderr)}") from error
    except subprocess.TimeoutExpired as error:
        raise BuildError(f"`{described}` did not finish in {error.timeout:.0f} s") from error
    except OSError as error:
        raise BuildError(f"cannot build {name} in {path.parent}: {error}") from error
    return path


def load_cached(
    name: str,
    source: Path,
    *,
    language: str,
    flags: list[str],
    key_extra: str = "",
    loader: Callable[[str], Library],
) -> Library:
    """:func:`build_cached`, then load the library with ``loader`` (``ctypes.CDLL``).

    Raises:
        BuildError: where it cannot be built or loaded, saying why.
    """
    path = build_cached(name, source, language=language, flags=flags, key_extra=key_extra)
    try:
        return loader(str(path))
    except OSError as error:
        raise BuildError(f"cannot load {path}: {error}") from error
