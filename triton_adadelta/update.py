"""One AdaDelta step over a segment table, on the backend its device runs.

Both APIs (:class:`triton_adadelta.Adadelta` and the PuzzleLib-style
:class:`triton_adadelta.puzzlelib.AdaDelta`, a facade over it) update through
:func:`update_`; the math itself lives in the Triton kernel and the CPU path.
"""

from __future__ import annotations

import torch

from . import cpu
from .flat import hparams_table, table_for_tensors
from .kernels.adadelta import (
    LR,
    QUANT_BLOCK,
    STATE_ALIGNMENT,
    SegmentTable,
    adadelta_step_,
    interpreter_enabled,
    state_dtype_for,
)

__all__ = ["backend_for", "implementation", "step_flat_", "update_"]


def backend_for(device: torch.device) -> str:
    """Which backend updates state on ``device``.

    Returns:
        ``"triton"`` (CUDA/ROCm), ``"triton-interpreter"`` (``TRITON_INTERPRET=1``)
        or ``"torch"`` (the CPU path, for CPU and any other device).
    """
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    return "torch"


def implementation(
    device: torch.device,
    param_dtype: torch.dtype,
    *,
    master: bool,
    stochastic_rounding: bool,
    state_dtype: torch.dtype | None = None,
) -> str:
    """The exact implementation that updates such a state: the backend, and on the CPU
    path which of its implementations (``"cpu-native"`` or ``"cpu-chunked"``)."""
    backend = backend_for(device)
    if backend != "torch":
        return backend
    return cpu.implementation(
        device, param_dtype, master=master, stochastic_rounding=stochastic_rounding, state_dtype=state_dtype
    )


def update_(
    table: SegmentTable,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    hparams: torch.Tensor,
    master: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One step over every piece of ``table``: one launch (see :func:`adadelta_step_`).

    ``backend`` (``"triton"`` or ``"torch"``) overrides :func:`backend_for`.
    """
    backend = backend or backend_for(square_avg.device)
    step = cpu.adadelta_step_cpu_ if backend == "torch" else adadelta_step_
    # (The scales only with 8-bit state: the CPU path takes them as keywords then.)
    scales = {} if square_avg_scale is None else {"square_avg_scale": square_avg_scale, "acc_delta_scale": acc_delta_scale}
    step(
        table,
        square_avg,
        acc_delta,
        hparams=hparams,
        master=master,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        grad_scale=grad_scale,
        found_inf=found_inf,
        **scales,
    )


def step_flat_(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    master: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One step on flat 1-D buffers, as a one-segment table (tests and benchmarks).

    Args:
        param, grad: 1-D contiguous buffers of one dtype; ``param`` is updated in place.
        square_avg, acc_delta, master: the state, as in :func:`adadelta_step_`; 8-bit
            state (uint8 codes, with ``square_avg_scale`` and ``acc_delta_scale``) is
            padded to a whole number of ``QUANT_BLOCK`` elements.
        lr, rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.
        backend: ``"triton"`` or ``"torch"`` (default: the device's, :func:`backend_for`).
    """
    quantized = square_avg.dtype == torch.uint8
    state_numel = -(-param.numel() // QUANT_BLOCK) * QUANT_BLOCK if quantized else param.numel()
    if param.shape != grad.shape or square_avg.shape != (state_numel,):
        raise ValueError(f"param {tuple(param.shape)}, grad {tuple(grad.shape)} and state "
                         f"{tuple(square_avg.shape)} must be the same size")  # fmt: skip
    table, _ = table_for_tensors([param], [grad], alignment=QUANT_BLOCK if quantized else STATE_ALIGNMENT)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    hparams = hparams_table(
        ((None if lr_is_tensor else lr, rho, eps, weight_decay, maximize),), state_dtype_for(param.dtype), param.device
    )
    if lr_is_tensor:
        hparams[0, LR].copy_(lr.reshape(()))
    update_(
        table,
        square_avg,
        acc_delta,
        hparams=hparams,
        master=master,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        grad_scale=grad_scale,
        found_inf=found_inf,
        square_avg_scale=square_avg_scale,
        acc_delta_scale=acc_delta_scale,
        backend=backend,
    )
