"""Compile a small native library once per machine, and cache it on disk.

The CPU path's fused loop (:mod:`triton_adadelta.cpu`) and the change watcher of the
flat buffers (:mod:`triton_adadelta.watch`) are built this way. A library is keyed
on everything that decides its code (source, flags, compiler, CPU, torch version),
so a cached one is reused only where it is valid. Where nothing can be built (no
compiler, no headers), :func:`build_cached` returns None and the caller falls back
to Python.
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

__all__ = ["build_cached", "cache_dir", "find_compiler", "load_cached"]


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


def build_cached(name: str, source: str, *, language: str, flags: list[str], key_extra: str = "") -> Path | None:
    """Compile ``source`` into a shared library, or find it in the cache.

    Args:
        name: file name stem of the library.
        source: the C or C++ source.
        language: ``"c"`` or ``"c++"``.
        flags: compiler and linker flags (``-shared`` and ``-o`` are the caller's).
        key_extra: anything else the binary depends on (a CPU model, a torch version).

    Returns:
        The library's path, or None where it cannot be built.
    """
    compiler = find_compiler(language)
    if compiler is None:
        return None
    key = hashlib.sha256("\0".join([source, " ".join(flags), compiler, platform.machine(), key_extra]).encode())
    path = cache_dir() / f"{name}_{key.hexdigest()[:24]}.so"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as build_dir:
            source_path = Path(build_dir) / (name + (".c" if language == "c" else ".cpp"))
            source_path.write_text(source)
            built = Path(build_dir) / path.name
            subprocess.run(
                [compiler, str(source_path), "-o", str(built), *flags],
                check=True,
                capture_output=True,
                timeout=300,
            )
            # Atomic: a concurrent process sees no library or a whole one.
            os.replace(built, path)
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def load_cached(
    name: str,
    source: str,
    *,
    language: str,
    flags: list[str],
    key_extra: str = "",
    loader: Callable[[str], Library],
) -> Library | None:
    """:func:`build_cached`, then load the library with ``loader`` (``ctypes.CDLL`` or
    ``ctypes.PyDLL``); None where it cannot be built or loaded."""
    path = build_cached(name, source, language=language, flags=flags, key_extra=key_extra)
    if path is None:
        return None
    try:
        return loader(str(path))
    except OSError:
        return None
