"""Hypothesis properties: the kernel (interpreter) and the CPU path against the fp64 oracle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import oracle
from tolerances import UNIT_ROUNDOFF, roundoff_units
from triton_adadelta.update import step_flat_


@dataclass(frozen=True)
class Mode:
    """A dtype mode: param/grad dtype, state dtype, and how the param is stored."""

    name: str
    param_dtype: torch.dtype
    master: bool = False
    stochastic_rounding: bool = False
    compressed_state: bool = False  # state_dtype=torch.bfloat16: stored rounded stochastically
    quantized_state: bool = False  # state_dtype=torch.uint8: 8-bit codes, a scale per block

    @property
    def state_dtype(self) -> torch.dtype:
        if self.compressed_state:
            return torch.bfloat16
        if self.quantized_state:
            return torch.uint8
        return torch.float64 if self.param_dtype == torch.float64 else torch.float32

    @property
    def compute(self) -> str:
        return "float64" if self.param_dtype == torch.float64 else "float32"


MODES = [
    Mode("fp32", torch.float32),
    Mode("fp64", torch.float64),
    Mode("bf16", torch.bfloat16),
    Mode("fp16", torch.float16),
    Mode("bf16_master", torch.bfloat16, master=True),
    Mode("fp16_master", torch.float16, master=True),
    Mode("bf16_stochastic", torch.bfloat16, stochastic_rounding=True),
    Mode("fp16_stochastic", torch.float16, stochastic_rounding=True),
    # bf16 state (issue 15): each stored state value is a stochastic rounding of the
    # fp32 result, so one of the two bf16 neighbours of a value within the bound.
    Mode("fp32_bf16_state", torch.float32, compressed_state=True),
    Mode("bf16_bf16_state", torch.bfloat16, compressed_state=True),
    Mode("bf16_master_bf16_state", torch.bfloat16, master=True, compressed_state=True),
    Mode("fp16_stochastic_bf16_state", torch.float16, stochastic_rounding=True, compressed_state=True),
    # 8-bit state (issue 15): each block's scale and codes are the exact quantizer's
    # (tests/oracle.py) of values within the bound, rounded stochastically (check_quantized).
    Mode("fp32_u8_state", torch.float32, quantized_state=True),
    Mode("bf16_u8_state", torch.bfloat16, quantized_state=True),
    Mode("bf16_master_u8_state", torch.bfloat16, master=True, quantized_state=True),
    Mode("fp16_stochastic_u8_state", torch.float16, stochastic_rounding=True, quantized_state=True),
]
BACKENDS = {"kernel": "triton", "cpu": "torch"}
# Awkward sizes: one element, around the default block (4096), primes, many blocks.
SIZES = st.one_of(st.sampled_from([1, 2, 4095, 4096, 4097, 8191, 8193, 7919, 65521, 100_000]), st.integers(1, 20_000))


@st.composite
def hyper_parameters(draw):
    """Every valid value: lr >= 0, 0 <= rho <= 1, eps >= 0, weight_decay >= 0."""
    bounded = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    return {
        "lr": draw(st.one_of(st.just(0.0), st.just(1.0), bounded(0.0, 1e3))),
        "rho": draw(st.one_of(st.sampled_from([0.0, 0.9, 0.95, 1.0]), bounded(0.0, 1.0))),
        "eps": draw(st.one_of(st.sampled_from([0.0, 1e-30, 1e-6, 1.0]), bounded(0.0, 1e3))),
        "weight_decay": draw(st.one_of(st.just(0.0), bounded(0.0, 1e2))),
        "maximize": draw(st.booleans()),
    }


def gradients(rng: np.random.Generator, size: int, specials: bool) -> np.ndarray:
    """Magnitudes log-uniform over 1e-30..1e30, random signs; with zeros and subnormals."""
    grads = rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-30, 30, size)
    if specials:
        kind = rng.integers(0, 4, size)
        grads = np.where(kind == 0, 0.0, grads)
        grads = np.where(kind == 1, rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-45, -38, size), grads)
    return grads


def check_within(name: str, actual: torch.Tensor, exact: np.ndarray, magnitude: np.ndarray, mode: Mode,
                 stored: torch.dtype, stochastic: bool = False, undecided: np.ndarray | None = None) -> None:  # fmt: skip
    """The stored value lies within the error bound of the exact one, in the storage dtype.

    The computed value q satisfies |q - exact| <= bound; storing rounds q to
    nearest, which is monotone, so the store lies in [RN(exact - bound), RN(exact + bound)].
    A stochastic store may take the other neighbour: one step further out each side.
    Elements where ``undecided`` holds are not checked (see :func:`undecided_underflow`).
    """
    actual64 = actual.double().cpu().numpy()
    if undecided is not None:
        actual64, exact, magnitude = (np.where(undecided, 0.0, x) for x in (actual64, exact, magnitude))
    bound = roundoff_units() * UNIT_ROUNDOFF[mode.compute] * magnitude
    nan = np.isnan(exact)
    wrong_nan = np.flatnonzero(np.isnan(actual64) != nan)
    assert wrong_nan.size == 0, f"{name}[{wrong_nan[0]}] = {actual64[wrong_nan[0]]!r}, exact {exact[wrong_nan[0]]!r}: NaN differs"
    infinite = np.isinf(exact)
    assert np.array_equal(actual64[infinite], exact[infinite]), f"{name}: wrong infinities"
    finite = ~nan & ~infinite
    with np.errstate(invalid="ignore"):
        low = torch.from_numpy(np.where(finite, exact - bound, 0.0)).to(stored)
        high = torch.from_numpy(np.where(finite, exact + bound, 0.0)).to(stored)
    if stochastic:
        low = torch.nextafter(low, torch.full_like(low, -float("inf")))
        high = torch.nextafter(high, torch.full_like(high, float("inf")))
    low64, high64 = low.double().numpy(), high.double().numpy()
    bad = finite & ~((low64 <= actual64) & (actual64 <= high64))
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise AssertionError(
            f"{name}[{i}] = {actual64[i]!r}, exact {exact[i]!r}, allowed [{low64[i]!r}, {high64[i]!r}] "
            f"({bad.sum()} of {bad.size} out of bound)"
        )


def check_quantized(name: str, codes: torch.Tensor, scales: torch.Tensor, exact: np.ndarray, magnitude: np.ndarray,
                    mode: Mode, undecided: np.ndarray | None = None) -> None:  # fmt: skip
    """8-bit state: each block's scale and codes are the exact quantizer's of values within the bound.

    The computed values q satisfy |q - exact| <= bound. The block's scale depends on
    its largest q only, monotonically, so it lies between the scales of the largest
    lower and upper ends; given the scale, each code is q rounded stochastically on
    the block's grid, to one of its two neighbours, so it lies between the lower end
    rounded down and the upper end rounded up.
    A block with a non-finite value (or one the bound allows, or an undecided one)
    may have a NaN scale.
    """
    size = exact.size
    codes64 = codes[:size].cpu().numpy().astype(np.int64)
    scales64 = scales.double().cpu().numpy()
    bound = roundoff_units() * UNIT_ROUNDOFF[mode.compute] * magnitude
    with np.errstate(invalid="ignore"):
        low, high = np.maximum(exact - bound, 0.0), exact + bound
    free = np.zeros(size, dtype=bool) if undecided is None else undecided
    for block in range(-(-size // oracle.QUANT_BLOCK)):
        where = slice(block * oracle.QUANT_BLOCK, min(size, (block + 1) * oracle.QUANT_BLOCK))
        scale, block_codes = scales64[block], codes64[where]
        finite = np.isfinite(exact[where])
        may_be_nan = not finite.all() or (high[where] >= oracle.FP32_OVERFLOW).any() or free[where].any()
        if np.isnan(scale):
            assert may_be_nan, f"{name} block {block}: NaN scale, but every value is finite: {exact[where]}"
            continue
        assert finite.all(), f"{name} block {block}: scale {scale!r} for non-finite values"
        smallest, largest = oracle.block_scale(low[where].max()), oracle.block_scale(high[where].max())
        assert smallest <= scale <= largest and (scale == 0 or np.log2(scale).is_integer()), (
            f"{name} block {block}: scale {scale!r}, allowed [{smallest!r}, {largest!r}] (largest value "
            f"{exact[where].max()!r})"
        )
        if scale == 0:
            assert not block_codes.any(), f"{name} block {block}: scale 0 with codes {block_codes[block_codes != 0]}"
            continue
        stored = oracle.code_value(block_codes) * scale
        lowest = oracle.round_to_code_grid(low[where], scale, "down")
        highest = oracle.round_to_code_grid(high[where], scale, "up")
        bad = ~free[where] & ~((lowest <= stored) & (stored <= highest))
        if bad.any():
            i = np.flatnonzero(bad)[0]
            raise AssertionError(
                f"{name}[{where.start + i}] = code {block_codes[i]} x {scale!r} = {stored[i]!r}, exact "
                f"{exact[where][i]!r}, allowed [{lowest[i]!r}, {highest[i]!r}] ({bad.sum()} out of bound)"
            )


def run_and_check(backend: str, mode: Mode, size: int, hyper: dict, seed: int, steps: int, specials: bool,
                  grad_scale: float | None = None, device: torch.device = torch.device("cpu")) -> None:  # fmt: skip
    """``steps`` steps of ``backend`` on buffers on ``device``, each checked against the oracle."""
    rng = np.random.default_rng(seed)
    master = None
    # 8-bit state and the master copy are padded to whole quant blocks.
    state_size = -(-size // oracle.QUANT_BLOCK) * oracle.QUANT_BLOCK if mode.quantized_state else size
    if mode.master:
        master = torch.from_numpy(rng.standard_normal(state_size)).float().to(device)
        param = master[:size].to(mode.param_dtype)
    else:
        param = torch.from_numpy(rng.standard_normal(size)).to(device, mode.param_dtype)
    scales = {}
    if mode.quantized_state:
        # Random codes (half of them 0) and power-of-two scales, padded to whole blocks.
        n_blocks = -(-size // oracle.QUANT_BLOCK)
        padded = n_blocks * oracle.QUANT_BLOCK
        codes = lambda: torch.from_numpy(rng.integers(0, 256, padded) * (rng.random(padded) < 0.5)).to(device, torch.uint8)  # noqa: E731
        square_avg, acc_delta = codes(), codes()
        for name in ("square_avg_scale", "acc_delta_scale"):
            scales[name] = torch.from_numpy(2.0 ** rng.integers(-30, 10, n_blocks)).to(device, torch.float32)
        square_avg[size:] = 0
        acc_delta[size:] = 0
    else:
        square_avg = torch.from_numpy(rng.uniform(0, 10, size) * (rng.random(size) < 0.5)).to(device, mode.state_dtype)
        acc_delta = torch.from_numpy(rng.uniform(0, 10, size) * (rng.random(size) < 0.5)).to(device, mode.state_dtype)

    def state_values(name: str, buffer: torch.Tensor) -> np.ndarray:
        if not mode.quantized_state:
            return buffer.double().cpu().numpy().copy()
        scale = np.repeat(scales[f"{name}_scale"].double().cpu().numpy(), oracle.QUANT_BLOCK)
        return oracle.code_value(buffer.cpu().numpy()[:size]) * scale[:size]

    fp32_range = mode.compute == "float32"
    # The contract, as in torch: hyper-parameters act as fp32 scalars on fp32 math
    # (an lr of 1e-103 is 0 there). 1 - rho is computed in fp64 first, as torch does.
    to_scalar = (lambda x: float(np.float32(x))) if fp32_range else float  # noqa: E731
    oracle_hyper = {k: (to_scalar(v) if k != "maximize" else v) for k, v in hyper.items()}
    oracle_hyper["one_minus_rho"] = to_scalar(1.0 - hyper["rho"])
    for t in range(steps):
        grad = torch.from_numpy(gradients(rng, size, specials)).to(device, mode.param_dtype)
        # Copies: for fp64 buffers .double() is the buffer itself, which the step overwrites.
        weights_in = (master[:size] if master is not None else param).double().cpu().numpy().copy()
        v_in, u_in = state_values("square_avg", square_avg), state_values("acc_delta", acc_delta)
        scale_tensor = None if grad_scale is None else torch.tensor([grad_scale], device=device)
        step_flat_(
            param, grad, square_avg, acc_delta, **hyper, master=master,
            stochastic_rounding=mode.stochastic_rounding, seed=seed + t, grad_scale=scale_tensor,
            backend=BACKENDS[backend], **scales,
        )
        exact = oracle.adadelta_step(weights_in, grad.double().cpu().numpy(), v_in, u_in, **oracle_hyper, grad_scale=grad_scale, fp32_range=fp32_range)
        undecided = undecided_underflow(exact, oracle_hyper["eps"], mode) if fp32_range else None
        if mode.quantized_state:
            check_quantized("square_avg", square_avg, scales["square_avg_scale"], exact.square_avg,
                            exact.square_avg_magnitude, mode)  # fmt: skip
            check_quantized("acc_delta", acc_delta, scales["acc_delta_scale"], exact.acc_delta,
                            exact.acc_delta_magnitude, mode, undecided)  # fmt: skip
        else:
            check_within("square_avg", square_avg, exact.square_avg, exact.square_avg_magnitude, mode, mode.state_dtype,
                         mode.compressed_state)  # fmt: skip
            check_within("acc_delta", acc_delta, exact.acc_delta, exact.acc_delta_magnitude, mode, mode.state_dtype,
                         mode.compressed_state, undecided)  # fmt: skip
        if master is not None:
            check_within("master", master[:size], exact.param, exact.param_magnitude, mode, torch.float32, undecided=undecided)
            # The param is the master rounded to nearest, exactly.
            torch.testing.assert_close(param, master[:size].to(mode.param_dtype), rtol=0, atol=0, equal_nan=True)
        else:
            check_within("param", param, exact.param, exact.param_magnitude, mode, mode.param_dtype, mode.stochastic_rounding,
                         undecided)  # fmt: skip


def undecided_underflow(exact: oracle.Step, eps: float, mode: Mode) -> np.ndarray:
    """Where fp32 may or may not flush ``v + eps`` to 0, so that delta is 0/0 = NaN or not.

    With eps = 0 a denominator within roundoff of fp32's underflow threshold (half
    the smallest subnormal) is 0 or the smallest subnormal as the roundings of its
    inputs fall: a grad of 2**-75 plus a weight decay far below its ulp squares to
    exactly 2**-150 in fp32, a tie that rounds to 0, while the exact value lies just
    above it. acc_delta and the param then hang on a rounding, not on the math.
    """
    if eps != 0:
        return np.zeros(exact.square_avg.shape, dtype=bool)
    bound = roundoff_units() * UNIT_ROUNDOFF[mode.compute] * exact.square_avg_magnitude
    return np.abs(exact.denominator_unranged - oracle.FP32_UNDERFLOW) <= bound


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@given(size=SIZES, hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), specials=st.booleans())
@example(size=4097, hyper={"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}, seed=0, specials=True)
@example(size=1, hyper={"lr": 0.0, "rho": 1.0, "eps": 0.0, "weight_decay": 0.0, "maximize": True}, seed=1, specials=True)
# Found by Hypothesis: a squared grad at fp32's underflow tie, with eps = 0 (undecided_underflow).
@example(size=4095, hyper={"lr": 0.0, "rho": 0.0, "eps": 0.0, "weight_decay": 4.5539574578985916e-35, "maximize": False},
         seed=14750, specials=False)  # fmt: skip
def test_one_step_within_roundoff_of_fp64_oracle(backend, mode, size, hyper, seed, specials):
    run_and_check(backend, mode, size, hyper, seed, steps=1, specials=specials)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode", [MODES[0], MODES[2], MODES[4], MODES[6], MODES[8], MODES[10], MODES[12], MODES[14]], ids=lambda m: m.name)
@given(size=st.integers(1, 5000), hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), steps=st.integers(2, 6))
def test_every_step_of_a_trajectory_within_roundoff_of_fp64_oracle(backend, mode, size, hyper, seed, steps):
    run_and_check(backend, mode, size, hyper, seed, steps=steps, specials=False)


@pytest.mark.parametrize("backend", list(BACKENDS))
@given(size=st.integers(1, 5000), hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), log2_scale=st.integers(-20, 40))
def test_grad_scale_divides_the_gradient(backend, size, hyper, seed, log2_scale):
    run_and_check(backend, MODES[0], size, hyper, seed, steps=1, specials=True, grad_scale=2.0**log2_scale)
