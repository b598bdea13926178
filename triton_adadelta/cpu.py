"""The CPU path: the AdaDelta update as torch ops over the same flat buffers.

This is the update for CPU tensors (and any device Triton does not run on) when
``TRITON_INTERPRET`` is not set. It takes the same arguments as the Triton
launcher, :func:`triton_adadelta.kernels.adadelta_step_`, and follows the same
equations in the same order (see that module's docstring).

The buffers are walked in cache-sized chunks: each chunk is read from memory once,
and the dozen torch ops of the update then run on data that is still in cache,
instead of streaming the whole buffer from memory once per op.
"""

from __future__ import annotations

import torch

# Elements per chunk: 64K fp32 elements is 256 KiB per buffer, so the chunk's
# p, g, v, u and three scratch buffers stay within a 2 MiB L2.
CHUNK_ELEMENTS = 1 << 16


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, noise: torch.Tensor) -> None:
    """Store fp32 ``value`` into low-precision ``out``, rounding stochastically.

    ``value`` lies between two neighbours in ``out``'s dtype; it rounds to the far
    one with probability (distance to the near one) / (gap), so the expected store
    equals ``value``. ``noise`` is uniform in [0, 1).
    """
    nearest = value.to(out.dtype)
    nearest_value = nearest.float()
    # The other neighbour: the magnitude bits one up when |value| lies beyond
    # |nearest|, one down when it lies short of it.
    beyond = (value.abs() > nearest_value.abs()).to(torch.int16)
    other = (nearest.view(torch.int16) + (2 * beyond - 1)).view(out.dtype)
    fraction = (value - nearest_value) / (other.float() - nearest_value)
    # When value is exact, fraction is 0 (or NaN for a NaN gap): keep nearest.
    out.copy_(torch.where(noise < fraction, other, nearest))


def adadelta_step_torch_(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    step: torch.Tensor,
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
) -> None:
    """One AdaDelta step in place on flat buffers, with torch ops.

    Takes the arguments of :func:`triton_adadelta.kernels.adadelta_step_`.
    """
    if found_inf is not None and bool(found_inf.item()):
        # A CPU tensor's value is read without a device sync.
        return
    step.add_(1)
    compute_dtype = square_avg.dtype
    n_elements = param.numel()
    chunk = max(1, min(n_elements, CHUNK_ELEMENTS))
    scratch = [torch.empty(chunk, dtype=compute_dtype, device=param.device) for _ in range(4)]
    grad_scratch, std_scratch, delta_scratch, weight_scratch = scratch
    generator = None
    if stochastic_rounding:
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed)
    lr_is_tensor = isinstance(lr, torch.Tensor)

    for start in range(0, n_elements, chunk):
        end = min(start + chunk, n_elements)
        size = end - start
        param_chunk = param[start:end]
        # The fp32 (fp64) copy of the params that the update is applied to.
        if master is not None:
            weights = master[start:end]
        elif param.dtype == compute_dtype:
            weights = param_chunk
        else:
            weights = weight_scratch[:size].copy_(param_chunk)

        g = grad[start:end]
        if g.dtype != compute_dtype:
            g = grad_scratch[:size].copy_(g)
        if grad_scale is not None:
            g = torch.div(g, grad_scale, out=grad_scratch[:size])
        if maximize:
            g = torch.neg(g, out=grad_scratch[:size])
        if weight_decay != 0:
            g = torch.add(g, weights, alpha=weight_decay, out=grad_scratch[:size])

        square_avg_chunk = square_avg[start:end]
        acc_delta_chunk = acc_delta[start:end]
        square_avg_chunk.mul_(rho).addcmul_(g, g, value=1 - rho)
        std = torch.add(square_avg_chunk, eps, out=std_scratch[:size]).sqrt_()
        delta = torch.add(acc_delta_chunk, eps, out=delta_scratch[:size]).sqrt_()
        delta.div_(std).mul_(g)
        acc_delta_chunk.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        if lr_is_tensor:
            weights.sub_(delta.mul_(lr))
        else:
            weights.add_(delta, alpha=-lr)

        if weights is not param_chunk:
            if stochastic_rounding:
                noise = torch.rand(size, generator=generator, device=param.device)
                stochastic_round_(param_chunk, weights, noise)
            else:
                param_chunk.copy_(weights)
