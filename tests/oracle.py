"""An fp64 numpy oracle of the AdaDelta step, written from the equations alone.

It does not import the package. Each step is computed in fp64 from the given
inputs; ``fp32_range`` models the one thing fp64 precision hides, fp32's exponent
range: a result past 3.4e38 overflows to inf (a gradient of 1e30 squares to inf in
fp32 and in torch alike), and one below half the smallest subnormal underflows to 0
(a gradient of 1e-30 squares to 0, and with eps=0 that makes 0/0 = NaN).

Where the contract fuses a product into a sum (README, "Numerics contract": the
weight decay, the two running averages and the param update are each one fma), the
product is not rounded, so the range model applies to the sum only: ``p - lr * d``
with ``lr * d`` just past fp32's range is still finite, or an infinite ``p`` stays
infinite, where a rounded product would overflow first (and ``-inf + inf`` = NaN).

Besides the result, :func:`adadelta_step` returns a magnitude for each output: the
same computation run on absolute values, with the ratio's sensitivity added. A
correctly rounded fp32 evaluation differs from the exact result by at most a few
units of roundoff times that magnitude (the tolerance table says how many).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP32_MAX = float(np.finfo(np.float32).max)
# Values at or past this round to inf in fp32 (the max plus half an ulp).
FP32_OVERFLOW = FP32_MAX + 2.0**103
# Values at or below this round to 0 (half the smallest subnormal, ties to even).
FP32_UNDERFLOW = 2.0**-150
FP32_MIN_NORMAL = 2.0**-126
FP64_MIN_NORMAL = 2.0**-1022


@dataclass
class Step:
    """One step's exact results and their magnitudes (all float64 arrays)."""

    param: np.ndarray
    square_avg: np.ndarray
    acc_delta: np.ndarray
    param_magnitude: np.ndarray
    square_avg_magnitude: np.ndarray
    acc_delta_magnitude: np.ndarray
    # v + eps before the range model: where it lies within roundoff of fp32's underflow
    # threshold and eps is 0, fp32 may flush it to 0 (0/0 = NaN) or not.
    denominator_unranged: np.ndarray


def _range(x: np.ndarray, fp32_range: bool) -> np.ndarray:
    if not fp32_range:
        return x
    with np.errstate(invalid="ignore"):
        x = np.where(np.abs(x) >= FP32_OVERFLOW, np.copysign(np.inf, x), x)
        return np.where(np.abs(x) <= FP32_UNDERFLOW, np.copysign(0.0, x), x)


def times(a: np.ndarray | float, magnitude: np.ndarray) -> np.ndarray:
    """A product in a magnitude: an exact 0 factor (rho = 1, lr = 0, d = 0) makes
    the term exactly 0 in any precision, even beside an infinite magnitude."""
    with np.errstate(invalid="ignore"):
        return np.where((np.asarray(a) == 0) | (magnitude == 0), 0.0, np.multiply(a, magnitude))


def adadelta_step(
    param: np.ndarray,
    grad: np.ndarray,
    square_avg: np.ndarray,
    acc_delta: np.ndarray,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: float | None = None,
    one_minus_rho: float | None = None,
    fp32_range: bool = True,
) -> Step:
    """One step of torch.optim.Adadelta's equations in fp64.

    ``one_minus_rho`` defaults to ``1 - rho``; give it where the code under test
    rounds ``1 - rho`` itself (torch computes it in Python, then rounds to fp32).
    """
    if one_minus_rho is None:
        one_minus_rho = 1 - rho
    r = lambda x: _range(x, fp32_range)  # noqa: E731
    min_normal = FP32_MIN_NORMAL if fp32_range else FP64_MIN_NORMAL
    p = np.asarray(param, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    v = np.asarray(square_avg, dtype=np.float64)
    u = np.asarray(acc_delta, dtype=np.float64)
    with np.errstate(all="ignore"):
        if grad_scale is not None:
            g = r(g / grad_scale)
        if maximize:
            g = -g
        # Magnitudes: the computation on absolute values. Each carries the smallest
        # normal too: below it fp32 keeps fewer bits, so roundoff is at most
        # u * max(|x|, min_normal) there (a subnormal g*g loses most of its bits).
        g_magnitude = np.abs(g) + min_normal
        if weight_decay != 0:
            g_magnitude = r(np.abs(g) + weight_decay * np.abs(p)) + min_normal
            g = r(g + weight_decay * p)  # fused
        v_new = r(r(rho * v) + r(one_minus_rho * g) * g)  # fused
        v_magnitude = r(r(rho * v) + times(r(times(one_minus_rho, g_magnitude)), g_magnitude)) + min_normal
        denominator_unranged = r(rho * v) + one_minus_rho * g * g + eps
        ratio = np.sqrt(r(u + eps)) / np.sqrt(r(v_new + eps))
        d = r(ratio * g)
        # |error of d| <= ratio * |error of g| + |d| * (relative error of the ratio),
        # and the ratio's relative error grows as v's magnitude exceeds v itself.
        # (An infinite v is exact under the fp32 range model.)
        relative = np.where(np.isinf(v_new), 1.0, v_magnitude / r(v_new + eps))
        d_magnitude = r(
            times(ratio, g_magnitude) + times(np.abs(d), 1 + relative)
        ) + min_normal
        u_new = r(r(rho * u) + r(one_minus_rho * d) * d)  # fused
        u_magnitude = r(r(rho * u) + times(r(times(one_minus_rho, d_magnitude)), d_magnitude)) + min_normal
        p_new = r(p - lr * d)  # fused
        p_magnitude = r(np.abs(p) + times(lr, d_magnitude)) + min_normal
    return Step(p_new, v_new, u_new, p_magnitude, v_magnitude, u_magnitude, denominator_unranged)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round fp64 values to a storage dtype (nearest even), back as float64."""
    import torch  # only for bf16, which numpy lacks

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(getattr(torch, dtype)).double().numpy()


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` at |x| (at least the smallest subnormal)."""
    mantissa_bits, min_exponent = {"float32": (23, -126), "bfloat16": (7, -126), "float16": (10, -14), "float64": (52, -1022)}[dtype]
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(x)))
    exponent = np.where(np.isfinite(exponent), np.maximum(exponent, min_exponent), min_exponent)
    return np.exp2(exponent - mantissa_bits)


# ---------------------------------------------------------------------------------
# 8-bit state (state_dtype=torch.uint8), from its description alone (README, "Dtype
# modes"): a block of 256 values shares a scale, a power of two; each value is stored
# as an unsigned float of 4 exponent and 4 mantissa bits with subnormals (values
# 2**-18 * m for m < 16, and (1 + m / 16) * 2**(e - 15) for e = 1..15), times the
# scale, rounded stochastically to one of its two neighbours on that grid; the scale
# is the power of two at or below the block's largest value once that is rounded up
# to 5 significant bits.
QUANT_BLOCK = 256
CODE_SMALLEST_NORMAL = 2.0**-14
CODE_MANTISSA_BITS = 4


def code_value(codes: np.ndarray) -> np.ndarray:
    """The value of each 8-bit code before its block's scale."""
    codes = np.asarray(codes, dtype=np.int64)
    exponent, mantissa = codes >> 4, codes & 15
    return np.where(exponent == 0, mantissa * 2.0**-18, (1 + mantissa / 16) * 2.0 ** (exponent - 15))


def round_to_code_grid(x: np.ndarray, scale: float, direction: str) -> np.ndarray:
    """``x`` (>= 0, fp64) rounded ``"down"`` or ``"up"`` to the grid of a block of ``scale``.

    The grid's spacing is 2**-18 * scale below 2**-14 * scale, and 1/16 of the binade
    above it; rounding up may reach the next binade (its first value is on the grid).
    """
    x = np.asarray(x, dtype=np.float64) / scale
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.maximum(x, 1e-300)))
    spacing = 2.0 ** (np.maximum(exponent, np.log2(CODE_SMALLEST_NORMAL)) - CODE_MANTISSA_BITS)
    rounding = np.floor if direction == "down" else np.ceil
    return rounding(x / spacing) * spacing * scale


def block_scale(block_max: float) -> float:
    """The scale of a block whose largest value is ``block_max`` (finite, >= 0): the
    power of two at or below it once rounded up to 5 significant bits; 0 below fp32's
    smallest normal."""
    if block_max < FP32_MIN_NORMAL:
        return 0.0
    exponent = np.floor(np.log2(block_max))
    rounded = np.ceil(block_max / 2.0 ** (exponent - 4)) * 2.0 ** (exponent - 4)
    return float(2.0 ** np.floor(np.log2(rounded)))
