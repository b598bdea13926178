"""The fused AdaDelta update: one pass over a flat buffer.

With ``g`` the gradient, ``v`` the running average of squared gradients
(``square_avg``) and ``u`` the running average of squared updates (``acc_delta``),
one step is, in this order::

    g = g / grad_scale            if a GradScaler's scale is given
    g = -g                        if maximize
    g = g + weight_decay * p      if weight_decay != 0
    v = rho * v + (1 - rho) * g * g
    d = sqrt(u + eps) / sqrt(v + eps) * g
    u = rho * u + (1 - rho) * d * d
    p = p - lr * d

Each element of ``p``, ``g``, ``v`` and ``u`` is loaded once and ``p``, ``v``, ``u``
are stored once; the math runs in fp32 registers (fp64 for fp64 params). The
square root and the division are the correctly rounded ones (``sqrt_rn``,
``div_rn``), and FMA contraction is switched off at launch, so every operation is
rounded once: the compiled kernel and Triton's interpreter give the same bits.

Dtype modes (the optimizer, not this kernel, decides how state is stored):

* params and grads in fp32, bf16 or fp16 against fp32 state; fp64 against fp64;
* ``master``: an fp32 master copy is read and written instead of the param, and the
  param gets the master rounded to nearest;
* ``stochastic_rounding``: the low-precision param store rounds up or down with
  probability proportional to the distance, so it is unbiased.

When ``found_inf`` is given and non-zero nothing is written and the step counts do
not advance, decided on the device with no host sync.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Block sizes and warp counts to tune over. A streaming kernel with no reuse wants
# enough bytes in flight per SM; 1024..8192 elements at 4..8 warps spans the usual
# best points for bandwidth-bound elementwise kernels on A100/H100 and MI300.
# `configs_for` keeps, per dtype and warp size, those that compile to 128-bit
# accesses without spills (checked by perf/sweep.py --target, tests/test_gpu_compile.py).
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_SIZE": block_size}, num_warps=num_warps)
    for block_size in (1024, 2048, 4096, 8192)
    for num_warps in (4, 8)
    if block_size // (32 * num_warps) <= 32  # at most 32 elements per thread
]

_ELEMENT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


def configs_for(param_dtype: torch.dtype, warp_size: int) -> list[triton.Config]:
    """The autotune configs that keep every access 128-bit and spill nothing.

    Each thread must hold at least 16 bytes of the narrowest streamed buffer (the
    param/grad dtype): bf16 at 1024 elements and 8 warps of 32 gets 4 elements per
    thread, 64-bit accesses. fp64 on 64-wide wavefronts keeps at most 8 elements per
    thread: 16 spilled 20 bytes on gfx942 (perf/sweep.py --target gfx942).
    """
    kept = []
    for config in AUTOTUNE_CONFIGS:
        per_thread = config.kwargs["BLOCK_SIZE"] // (warp_size * config.num_warps)
        if per_thread * _ELEMENT_BYTES[param_dtype] < 16:
            continue
        if param_dtype == torch.float64 and warp_size == 64 and per_thread > 8:
            continue
        kept.append(config)
    return kept


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuner hook: time only the configs that suit this dtype and device."""
    warp_size = triton.runtime.driver.active.get_current_target().warp_size
    allowed = {(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in configs_for(named_args["param_ptr"].dtype, warp_size)}
    return [c for c in configs if (c.kwargs["BLOCK_SIZE"], c.num_warps) in allowed] or configs


# Used when tuning is switched off, and by the interpreter (which has no driver to tune on).
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_NUM_WARPS = 8

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def size_bucket(n_elements: int) -> int:
    """Tuning key: ``n_elements`` rounded up to a power of two, at least 2**12.

    A training run then tunes once per bucket, not once per tensor size.
    """
    return max(4096, triton.next_power_of_2(n_elements))


def tuning_enabled() -> bool:
    """Autotuning is on unless ``TRITON_ADADELTA_AUTOTUNE=0``."""
    return os.environ.get("TRITON_ADADELTA_AUTOTUNE", "1") != "0"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sqrt(x):
    # sqrt_rn is fp32 only; fp64 sqrt is correctly rounded already.
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    # `/` on fp32 compiles to an approximate division; div_rn is IEEE. fp64 `/` is IEEE.
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _widen(x, COMPUTE_DTYPE: tl.constexpr):
    """Convert a loaded value to the compute dtype; bf16 by integer ops.

    bf16 is the top half of an fp32, so the shift is exact, subnormals included
    (the interpreter's own bf16 conversion flushes them to zero).
    """
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(COMPUTE_DTYPE)


@triton.jit
def _round_to_nearest(x, DTYPE: tl.constexpr):
    """Round to nearest even in DTYPE; bf16 by integer ops.

    The interpreter converts fp32 to bf16 by truncation; the integer form is the
    same correct rounding on a GPU and in the interpreter (it is c10's bf16 rounding).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # A NaN stays a (quiet) NaN instead of carrying into the exponent.
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["size_bucket"],
    # Tuning runs the in-place kernel once per config: restore every buffer it writes.
    restore_value=["param_ptr", "square_avg_ptr", "acc_delta_ptr", "master_ptr", "step_ptr"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)
@triton.jit
def adadelta_kernel(
    param_ptr,
    grad_ptr,
    square_avg_ptr,
    acc_delta_ptr,
    master_ptr,
    step_ptr,
    lr_ptr,
    hparams_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    n_elements,
    n_steps,
    size_bucket,
    lr,
    rho,
    one_minus_rho,
    eps,
    weight_decay,
    seed,
    MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HPARAMS_IN_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 so that a buffer past 2**31 elements addresses correctly.
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    # A GradScaler that found inf/NaN skips the step on the device: with no
    # elements left in range every load and store is masked off.
    n_active = n_elements
    step_increment = 1.0
    if HAS_FOUND_INF:
        found_inf = tl.load(found_inf_ptr).to(tl.float32)
        n_active = tl.where(found_inf == 0.0, n_elements, 0)
        step_increment = tl.where(found_inf == 0.0, 1.0, 0.0)
    mask = offs < n_active

    if pid == 0:
        # The step counts of the params in this buffer; the update does not use them.
        for start in range(0, n_steps, BLOCK_SIZE):
            step_offs = start + tl.arange(0, BLOCK_SIZE)
            step_mask = step_offs < n_steps
            steps = tl.load(step_ptr + step_offs, mask=step_mask)
            tl.store(step_ptr + step_offs, steps + step_increment, mask=step_mask)

    if HPARAMS_IN_TENSOR:
        # fp64 params: hyper-parameters at fp64 precision (scalar args are fp32).
        rho = tl.load(hparams_ptr + 0)
        one_minus_rho = tl.load(hparams_ptr + 1)
        eps = tl.load(hparams_ptr + 2)
        weight_decay = tl.load(hparams_ptr + 3)
        lr = tl.load(hparams_ptr + 4)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr)
    lr = tl.cast(lr, COMPUTE_DTYPE)
    rho = tl.cast(rho, COMPUTE_DTYPE)
    one_minus_rho = tl.cast(one_minus_rho, COMPUTE_DTYPE)
    eps = tl.cast(eps, COMPUTE_DTYPE)
    weight_decay = tl.cast(weight_decay, COMPUTE_DTYPE)

    if HAS_MASTER:
        param = tl.load(master_ptr + offs, mask=mask).to(COMPUTE_DTYPE)
    else:
        param = _widen(tl.load(param_ptr + offs, mask=mask), COMPUTE_DTYPE)
    grad = _widen(tl.load(grad_ptr + offs, mask=mask), COMPUTE_DTYPE)
    square_avg = tl.load(square_avg_ptr + offs, mask=mask).to(COMPUTE_DTYPE)
    acc_delta = tl.load(acc_delta_ptr + offs, mask=mask).to(COMPUTE_DTYPE)

    if HAS_GRAD_SCALE:
        grad = _div(grad, tl.load(grad_scale_ptr).to(COMPUTE_DTYPE))
    if MAXIMIZE:
        grad = -grad
    # Explicit FMAs where a product meets a sum: one rounding instead of two, the
    # same on a GPU and in the interpreter (which implements fma exactly).
    if weight_decay != 0.0:
        # As torch: with no weight decay an inf or NaN param does not reach the grad.
        grad = tl.fma(param, weight_decay, grad)
    square_avg = tl.fma(one_minus_rho * grad, grad, square_avg * rho)
    std = _sqrt(square_avg + eps)
    delta = _div(_sqrt(acc_delta + eps), std) * grad
    acc_delta = tl.fma(one_minus_rho * delta, delta, acc_delta * rho)
    param = tl.fma(delta, -lr, param)

    tl.store(square_avg_ptr + offs, square_avg.to(square_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_delta_ptr + offs, acc_delta.to(acc_delta_ptr.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, param.to(master_ptr.dtype.element_ty), mask=mask)
    if STOCHASTIC_ROUNDING:
        low_ty: tl.constexpr = param_ptr.dtype.element_ty
        nearest = _round_to_nearest(param, low_ty)
        nearest_value = _widen(nearest, tl.float32)
        # The other neighbour of `param`: the magnitude bits one up when |param|
        # lies beyond |nearest|, one down when it lies short of it.
        beyond = tl.abs(param) > tl.abs(nearest_value)
        other_bits = nearest.to(tl.int16, bitcast=True) + tl.where(beyond, 1, -1).to(tl.int16)
        other = other_bits.to(low_ty, bitcast=True)
        # P(other) = distance to nearest / gap, so the expected store is `param`.
        # (Exact values give fraction 0, or NaN for a NaN gap: both keep nearest.)
        fraction = _div(param - nearest_value, _widen(other, tl.float32) - nearest_value)
        rounded = tl.where(tl.rand(seed, offs) < fraction, other, nearest)
        tl.store(param_ptr + offs, rounded, mask=mask)
    else:
        tl.store(param_ptr + offs, _round_to_nearest(param, param_ptr.dtype.element_ty), mask=mask)

def _check_scalar_tensor(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.numel() != 1:
        raise ValueError(f"{name} must have one element, got {value.numel()}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the param buffer is on {device}")


def adadelta_step_(
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
    """Apply one AdaDelta step in place to flat buffers, in one kernel launch.

    Args:
        param: 1-D contiguous params (fp32, bf16, fp16 or fp64); updated in place.
        grad: gradient, same dtype and size as ``param``.
        square_avg, acc_delta: the state, fp32 (fp64 for fp64 params); updated in place.
        step: 1-D fp32 step counts of the params in the buffer, each advanced by one.
        lr: learning rate, a float or a 1-element tensor on the buffer's device.
        rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.
        master: optional fp32 master copy of low-precision params, updated in place;
            ``param`` then receives the master rounded to nearest.
        stochastic_rounding: round low-precision param stores stochastically.
        seed: seed of the stochastic rounding.
        grad_scale: optional 1-element tensor the gradient is divided by.
        found_inf: optional 1-element tensor; when non-zero nothing is written.

    Raises:
        ValueError: if the buffers do not fit together or the device cannot run Triton.
    """
    device = param.device
    buffers = {"param": param, "grad": grad, "square_avg": square_avg, "acc_delta": acc_delta}
    if master is not None:
        buffers["master"] = master
    for name, buffer in buffers.items():
        if buffer.device != device:
            raise ValueError(f"{name} is on {buffer.device} but param is on {device}")
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(f"{name} must be a 1-D contiguous buffer, got shape {tuple(buffer.shape)}")
        if buffer.numel() != param.numel():
            raise ValueError(f"{name} has {buffer.numel()} elements but param has {param.numel()}")
    if device.type == "cpu" and not interpreter_enabled():
        raise ValueError("CPU buffers run the Triton kernel only with TRITON_INTERPRET=1")
    if param.dtype not in _PARAM_DTYPES:
        raise ValueError(f"param dtype {param.dtype} is not supported; use one of {_PARAM_DTYPES}")
    if grad.dtype != param.dtype:
        raise ValueError(f"grad dtype {grad.dtype} does not match param dtype {param.dtype}")
    state_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    for name in ("square_avg", "acc_delta"):
        if buffers[name].dtype != state_dtype:
            raise ValueError(f"{name} must be {state_dtype} for {param.dtype} params, got {buffers[name].dtype}")
    if master is not None:
        if param.dtype not in _LOW_PRECISION:
            raise ValueError(f"master weights are for bf16/fp16 params, not {param.dtype}")
        if master.dtype != torch.float32:
            raise ValueError(f"master must be float32, got {master.dtype}")
    if stochastic_rounding and (param.dtype not in _LOW_PRECISION or master is not None):
        raise ValueError("stochastic_rounding is for bf16/fp16 params without master weights")
    if step.dim() != 1 or step.dtype != torch.float32 or step.device != device:
        raise ValueError(f"step must be a 1-D float32 tensor on {device}")
    lr_is_tensor = isinstance(lr, torch.Tensor)
    for name, value in (("lr", lr), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if isinstance(value, torch.Tensor):
            _check_scalar_tensor(name, value, device)

    n_elements = param.numel()
    hparams_in_tensor = param.dtype == torch.float64
    hparams = None
    if hparams_in_tensor:
        lr_value = 0.0 if lr_is_tensor else float(lr)
        hparams = torch.tensor([rho, 1.0 - rho, eps, weight_decay, lr_value], dtype=torch.float64, device=device)
    args = (
        param, grad, square_avg, acc_delta, master, step,
        lr if lr_is_tensor else None, hparams, grad_scale, found_inf,
        n_elements, step.numel(), size_bucket(n_elements),
        0.0 if lr_is_tensor else float(lr), float(rho), 1.0 - float(rho), float(eps), float(weight_decay), seed,
    )
    constexprs = dict(
        MAXIMIZE=bool(maximize),
        HAS_MASTER=master is not None,
        STOCHASTIC_ROUNDING=bool(stochastic_rounding),
        LR_IS_TENSOR=lr_is_tensor,
        HPARAMS_IN_TENSOR=hparams_in_tensor,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        COMPUTE_DTYPE=tl.float64 if hparams_in_tensor else tl.float32,
        # Each operation rounded once, as the interpreter does (see the module docstring).
        enable_fp_fusion=False,
    )

    def grid(meta: dict) -> tuple[int]:
        # At least one program: it advances the step counts even of an empty buffer.
        return (max(1, triton.cdiv(n_elements, meta["BLOCK_SIZE"])),)

    if tuning_enabled() and not interpreter_enabled():
        adadelta_kernel[grid](*args, **constexprs)
    else:
        # The autotuner needs a GPU driver to time configs: use the heuristic config.
        adadelta_kernel.fn[grid](*args, **constexprs, BLOCK_SIZE=DEFAULT_BLOCK_SIZE, num_warps=DEFAULT_NUM_WARPS)
