"""Checkpoints that survive an interrupted save.

``torch.save(obj, path)`` writes in place: a job killed mid-save leaves a truncated
file where the last good checkpoint was. :func:`save_checkpoint` writes a temporary
file beside ``path``, flushes it to disk, and then renames it over ``path`` in one
atomic step, so ``path`` always holds either the previous checkpoint or the new one.

Otherwise it writes what ``torch.save(obj, path)`` would: a new file gets the mode
the umask gives (0644 with the usual 022), an existing one keeps its mode, and a
``path`` that is a symlink is written through (the file it points to is replaced,
the link stays).
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def _create_beside(target: str) -> tuple[int, str]:
    """A new file beside ``target``, opened for writing, with the mode ``open()``
    gives a new file (0666 less the umask, applied by the kernel), unlike
    :func:`tempfile.mkstemp`'s 0600."""
    directory, name = os.path.split(target)
    while True:
        temporary = os.path.join(directory, f"{name}.{secrets.token_hex(6)}.partial")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), temporary
        except FileExistsError:
            continue


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """Save ``obj`` with :func:`torch.save` so that an interrupted save loses nothing.

    Args:
        obj: what to save, e.g. ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}``.
        path: the checkpoint file; replaced only once the new one is fully on disk.
            Where it is a symlink, the file it points to is replaced and the link kept.
    """
    # Through symlinks, as torch.save's open() goes: the rename must land on the file.
    target = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(target)
    handle, temporary = _create_beside(target)
    try:
        with os.fdopen(handle, "wb") as file:
            try:
                # An existing checkpoint keeps its mode, as when torch.save rewrites it in place.
                os.fchmod(file.fileno(), stat.S_IMODE(os.stat(target).st_mode))
            except FileNotFoundError:
                pass
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    # The rename itself must reach the disk too.
    directory_handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)
