"""Compile a small native library once per machine, and cache it on disk.

The CPU path's fused loop (:mod:`triton_adadelta.cpu`, from ``csrc/adadelta_cpu.c``)
is built this way. A library is keyed on everything that decides its code (source,
flags, compiler, machine, and what the caller adds, such as the CPU model), so a
cached one is reused only where it is valid. Where nothing can be built (no
compiler, no headers, a compiler error), :func:`build_cached` raises
:class:`BuildError` saying why, and the caller falls back to Python.

A cached library is code that will run in the training process, so the cache lives
by the rules of pip's and Triton's own caches, and a bad file never crashes a process:

* The cache directory is created 0700. One that another user owns, or that others
  can write (unless it is sticky and ours, as ``/tmp``-like directories are), is
  refused.
* Only a regular file owned by the current user that no one else can write is loaded,
  and only when its SHA-256 matches the digest recorded beside it (``<library>.sha256``).
  A truncated file (a power loss, a full disk) or a foreign one is rebuilt instead.
* A library is written durably: the file is fsynced, renamed into place, and the
  directory fsynced, so a crash leaves no library, or a whole one.
* A source written as several parts (``parts``: translation units, each chosen by
  its own flags) is compiled one part per process, at once, and linked.
* The compiler runs for at most ``timeout_s`` seconds (its whole process group is
  killed then). A timeout is remembered for that key (``<library>.failed``) for
  :data:`FAILURE_MEMORY_S`, so later processes fall back at once instead of waiting.
* A build that a step waits for runs inside :func:`awaited_build`; a build in the
  background (the param reader's) first calls :func:`wait_for_awaited_builds`, so
  that the two do not share the cores and push the awaited one past its time limit.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

Library = TypeVar("Library", bound=ctypes.CDLL)

__all__ = [
    "BUILD_TIMEOUT_S",
    "FAILURE_MEMORY_S",
    "BuildError",
    "NotBuilt",
    "awaited_build",
    "build_cached",
    "cache_dir",
    "cpu_model",
    "find_compiler",
    "load_cached",
    "wait_for_awaited_builds",
]

# How much of a failed compiler's stderr a BuildError keeps: the first error and its
# context, not pages of follow-on errors.
_STDERR_TAIL_CHARS = 2000

# The compiler's time limit where the caller names none. The slowest build measured
# is the C++ param reader's (triton_adadelta/reader.py): 16-18 s alone and 29 s with
# two builds sharing the 2-core machine we measure on.
BUILD_TIMEOUT_S = 35.0

# How long a timed-out build is remembered: later processes fall back at once for
# this long, then try again. An hour: a hanging compiler costs one wait an hour, and
# a build that timed out once under a passing overload is not off for long. Deleting
# the ``.failed`` file retries at once.
FAILURE_MEMORY_S = 3600.0

# Mode bits that let someone other than the owner change a file or a directory.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


# How many builds that a step waits for are running in this process.
_awaited = threading.Condition()
_awaited_builds = 0


@contextmanager
def awaited_build() -> Iterator[None]:
    """Mark the build inside as one that a step waits for (the CPU path's loop): a
    background build waits for it in :func:`wait_for_awaited_builds`."""
    global _awaited_builds
    with _awaited:
        _awaited_builds += 1
    try:
        yield
    finally:
        with _awaited:
            _awaited_builds -= 1
            _awaited.notify_all()


def wait_for_awaited_builds(timeout_s: float) -> None:
    """Return once no :func:`awaited_build` runs in this process, or after ``timeout_s``.

    In a fresh cache the first step builds the CPU path's loop (two compilers at
    once) while the param reader's build starts in the background: on 2 cores the
    three compilers pushed the loop's build past its limit (then 20 s).
    """
    with _awaited:
        _awaited.wait_for(lambda: _awaited_builds == 0, timeout_s)


class BuildError(RuntimeError):
    """A native library could not be built or loaded; the message says why."""


class NotBuilt(BuildError):
    """``cache_only=True`` and the library is not in the cache yet."""


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


def _build_timeout(timeout_s: float) -> float:
    """``$TRITON_ADADELTA_BUILD_TIMEOUT`` (seconds, for slow machines), else ``timeout_s``."""
    value = os.environ.get("TRITON_ADADELTA_BUILD_TIMEOUT")
    if not value:
        return timeout_s
    try:
        timeout = float(value)
    except ValueError:
        timeout = float("nan")
    if not timeout > 0:
        raise BuildError(f"TRITON_ADADELTA_BUILD_TIMEOUT={value!r} is not a positive number of seconds")
    return timeout


# ------------------------------------------------------------------ trust checks
def _private_dir(directory: Path) -> None:
    """Create ``directory`` (0700) and check that no one else can change what is in it.

    Raises:
        BuildError: the directory is another user's, or others can write it and it is
            not sticky, or it cannot be created.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(directory)
    except OSError as error:
        raise BuildError(f"cannot create the cache directory {directory}: {error}") from error
    advice = "set TRITON_ADADELTA_CACHE_DIR to a directory of your own"
    if not stat.S_ISDIR(info.st_mode):
        raise BuildError(f"the cache directory {directory} is not a directory; {advice}")
    if info.st_uid != os.getuid():
        raise BuildError(f"the cache directory {directory} belongs to uid {info.st_uid}, not to this user; {advice}")
    # In a sticky directory others may add files but not replace ours (and only ours load).
    if info.st_mode & _WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
        raise BuildError(
            f"the cache directory {directory} is writable by others "
            f"(mode {stat.filemode(info.st_mode)}) and not sticky; {advice}"
        )


def _read_trusted(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of ours that no one else can
    write (a symlink is not followed); None otherwise, or where it does not exist."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & _WRITABLE_BY_OTHERS:
            return None
        with os.fdopen(os.dup(handle), "rb") as file:
            return file.read()
    except OSError:
        return None
    finally:
        os.close(handle)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _failure_path(path: Path) -> Path:
    return path.with_name(path.name + ".failed")


def _verified(path: Path) -> bool:
    """Whether ``path`` is a trusted library whose bytes match its recorded digest."""
    library = _read_trusted(path)
    recorded = _read_trusted(_digest_path(path))
    return library is not None and recorded is not None and hashlib.sha256(library).hexdigest() == recorded.decode(
        errors="replace"
    ).strip()


def _remembered_failure(path: Path) -> str | None:
    """The reason a recent build of this key timed out, or None."""
    marker = _failure_path(path)
    reason = _read_trusted(marker)
    if reason is None:
        return None
    try:
        if time.time() - os.stat(marker).st_mtime > FAILURE_MEMORY_S:
            return None
    except OSError:
        return None
    return reason.decode(errors="replace").strip()


# ----------------------------------------------------------------- durable writes
def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_file(path: Path, data: bytes, scratch: Path) -> None:
    """Write ``data`` to ``path`` atomically: a file in ``scratch``, fsynced, renamed."""
    temporary = scratch / (path.name + ".partial")
    with open(temporary, "wb") as file:
        # Whatever the umask (002 would make it group-writable, and so never trusted).
        os.fchmod(file.fileno(), 0o644)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _run_compilers(commands: list[list[str]], deadline: float) -> None:
    """Run ``commands`` at once, each in a process group of its own, until the
    ``time.monotonic()`` deadline; on timeout or a failure kill every group still
    running (a compiler driver's children too, which would otherwise keep running).

    Raises:
        subprocess.CalledProcessError: one failed (the first to, with its stderr).
        subprocess.TimeoutExpired: they ran past the deadline.
    """
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
        )
        for command in commands
    ]
    try:
        for process, command in zip(processes, commands):
            _, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 0.0))
            if process.returncode != 0:
                raise subprocess.CalledProcessError(process.returncode, command, stderr=stderr)
    finally:
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.communicate()


def build_cached(
    name: str,
    source: Path,
    *,
    language: str,
    flags: list[str],
    key_extra: str = "",
    timeout_s: float = BUILD_TIMEOUT_S,
    cache_only: bool = False,
    parts: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Compile the source file ``source`` into a shared library, or find it in the cache.

    Args:
        name: file name stem of the library.
        source: the C or C++ source file (its text is part of the cache key).
        language: ``"c"`` or ``"c++"``.
        flags: compiler and linker flags (``-o`` is added here).
        key_extra: anything else the binary depends on (a CPU model, a torch version).
        timeout_s: the compiler's time limit, a few seconds more than the slowest
            build measured (``$TRITON_ADADELTA_BUILD_TIMEOUT`` overrides it).
        cache_only: never compile: raise :class:`NotBuilt` where the cache has no
            library (one built elsewhere, by another process, is found).
        parts: the extra flags of each translation unit (``(("-DPART=0",), ("-DPART=1",))``):
            the source is compiled once per part, at once, and the parts linked;
            None: one compile.

    Returns:
        The path of a library that passed the trust checks (see the module docstring).

    Raises:
        BuildError: no compiler, an unreadable source, a cache directory others can
            change, a failed compile (with the tail of the compiler's stderr), or a
            compile that ran past the limit (now or, remembered, in a recent process).
    """
    compiler = find_compiler(language)
    if compiler is None:
        raise BuildError(f"no {language} compiler found (set {'CC' if language == 'c' else 'CXX'} or install one)")
    try:
        text = source.read_text()
    except OSError as error:
        raise BuildError(f"cannot read {source}: {error}") from error
    # (A build in one part keeps the key it had before parts existed.)
    keyed = [text, " ".join(flags), compiler, platform.machine(), key_extra]
    keyed += [f"parts={parts}"] if parts else []
    key = hashlib.sha256("\0".join(keyed).encode())
    directory = cache_dir()
    path = directory / f"{name}_{key.hexdigest()[:24]}.so"
    _private_dir(directory)
    if _verified(path):
        return path
    if cache_only:
        raise NotBuilt(f"{path.name} is not in {directory} yet")
    remembered = _remembered_failure(path)
    if remembered is not None:
        raise BuildError(f"{remembered} (remembered from an earlier process; delete {_failure_path(path)} to retry)")
    timeout = _build_timeout(timeout_s)
    # How the build is named in an error: the output file is a temporary one.
    described = " ".join([compiler, str(source), *flags] + ([f"(parts: {parts})"] if parts else []))
    try:
        with tempfile.TemporaryDirectory(dir=directory) as build_dir:
            built = Path(build_dir) / path.name
            deadline = time.monotonic() + timeout
            if not parts:
                _run_compilers([[compiler, str(source), "-o", str(built), *flags]], deadline)
            else:
                objects = [str(Path(build_dir) / f"part{k}.o") for k in range(len(parts))]
                _run_compilers(
                    [[compiler, "-c", str(source), *part, "-o", obj, *flags] for part, obj in zip(parts, objects)],
                    deadline,
                )
                _run_compilers([[compiler, *objects, "-o", str(built), *flags]], deadline)
            # Whatever the umask, no one else may write a library that we will load.
            os.chmod(built, 0o755)
            with open(built, "rb") as file:
                library = file.read()
                os.fsync(file.fileno())
            # The library first, then its digest: a crash in between leaves a file
            # without a digest, which is rebuilt.
            os.replace(built, path)
            _write_file(_digest_path(path), hashlib.sha256(library).hexdigest().encode(), Path(build_dir))
            _fsync_dir(directory)
    except subprocess.CalledProcessError as error:
        raise BuildError(f"`{described}` failed with exit code {error.returncode}:\n{_tail(error.stderr)}") from error
    except subprocess.TimeoutExpired as error:
        reason = f"`{described}` did not finish in {timeout:g} s"
        try:
            _write_file(_failure_path(path), reason.encode(), directory)
        except OSError:
            pass  # not remembered: the next process tries again
        raise BuildError(reason) from error
    except OSError as error:
        raise BuildError(f"cannot build {name} in {directory}: {error}") from error
    return path


def load_cached(
    name: str,
    source: Path,
    *,
    language: str,
    flags: list[str],
    key_extra: str = "",
    loader: Callable[[str], Library],
    symbols: tuple[str, ...] = (),
    timeout_s: float = BUILD_TIMEOUT_S,
    cache_only: bool = False,
    parts: Sequence[Sequence[str]] | None = None,
) -> Library:
    """:func:`build_cached`, then load the library with ``loader`` (``ctypes.CDLL``).

    Args:
        symbols: names the library must export. A library that lacks one is a bad
            file: it is removed from the cache (the next process rebuilds it) and
            this one gets a ``BuildError``. (The process cannot load the rebuilt file
            itself: the dynamic loader hands back the handle it has for that path.)
        timeout_s, cache_only, parts: see :func:`build_cached`.

    Raises:
        BuildError: where it cannot be built or loaded, saying why.
    """
    path = build_cached(
        name,
        source,
        language=language,
        flags=flags,
        key_extra=key_extra,
        timeout_s=timeout_s,
        cache_only=cache_only,
        parts=parts,
    )
    try:
        library = loader(str(path))
    except OSError as error:
        raise BuildError(f"cannot load {path}: {error}") from error
    missing = [symbol for symbol in symbols if not hasattr(library, symbol)]
    if missing:
        for bad in (path, _digest_path(path)):
            try:
                bad.unlink()
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise BuildError(f"{path} lacks {missing} and cannot be removed: {error}") from error
        raise BuildError(f"{path} lacks the symbols {missing}; it was removed, and the next process rebuilds it")
    return library
