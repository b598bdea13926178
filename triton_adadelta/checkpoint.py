"""Checkpoints that survive an interrupted save.

``torch.save(obj, path)`` writes in place: a job killed mid-save leaves a truncated
file where the last good checkpoint was. :func:`save_checkpoint` writes a temporary
file beside ``path``, flushes it to disk, and then renames it over ``path`` in one
atomic step, so ``path`` always holds either the previous checkpoint or the new one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """Save ``obj`` with :func:`torch.save` so that an interrupted save loses nothing.

    Args:
        obj: what to save, e.g. ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}``.
        path: the checkpoint file; replaced only once the new one is fully on disk.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
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
