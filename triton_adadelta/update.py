"""One AdaDelta step on a flat buffer, on the backend its device runs.

Both APIs (:class:`triton_adadelta.Adadelta` and the PuzzleLib-style
:class:`triton_adadelta.puzzlelib.AdaDelta`) update their buffers through
:func:`apply_update_`; the math itself lives in the Triton kernel and the CPU path.
"""

from __future__ import annotations

from typing import Callable

import torch

from .cpu import adadelta_step_torch_
from .flat import FlatBuffer
from .kernels import adadelta_step_
from .kernels.adadelta import _LOW_PRECISION, interpreter_enabled

__all__ = ["apply_update_", "backend_for"]


def backend_for(device: torch.device) -> str:
    """Which implementation updates buffers on ``device``.

    Returns:
        ``"triton"`` (CUDA/ROCm), ``"triton-interpreter"`` (``TRITON_INTERPRET=1``)
        or ``"torch"`` (the CPU path, for CPU and any other device).
    """
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    return "torch"


def update_fn(device: torch.device) -> Callable[..., None]:
    return adadelta_step_torch_ if backend_for(device) == "torch" else adadelta_step_


def apply_update_(
    buffer: FlatBuffer,
    runs: list[tuple[int, int]],
    *,
    lr: float | torch.Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    stochastic_rounding: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> list[int]:
    """Update the segments ``runs`` of ``buffer`` (from :meth:`FlatBuffer.gather_grads`).

    One launch per run: one per buffer when every param has a grad.

    Returns:
        The segments that got their state now, at their first grad.
    """
    if not runs:
        return []
    device = buffer.device
    update = update_fn(device)
    if isinstance(lr, torch.Tensor) and lr.device != device:
        # A host tensor's value is read without a device sync.
        lr = float(lr) if lr.device.type == "cpu" else lr.to(device)
    stochastic_rounding = stochastic_rounding and buffer.dtype in _LOW_PRECISION and buffer.master is None
    # Drawn from torch's generator, so torch.manual_seed makes the rounding reproducible.
    seed = int(torch.randint(1, 2**31 - 1, (1,)).item()) if stochastic_rounding else 0
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    initialized = []
    for first, stop in runs:
        if not buffer.all_initialized:
            for i in range(first, stop):
                if not buffer.initialized[i]:
                    buffer.initialized[i] = True
                    initialized.append(i)
            buffer.all_initialized = all(buffer.initialized)
        start, end = buffer.run_range(first, stop)
        update(
            buffer.param[start:end],
            buffer.grad[start:end],
            buffer.square_avg[start:end],
            buffer.acc_delta[start:end],
            buffer.steps[first:stop],
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            master=buffer.master[start:end] if buffer.master is not None else None,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
    return initialized
