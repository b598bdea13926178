"""The 8-bit state's code, in torch ops: loading a state_dict, handing out fp32 copies.

8-bit state (``state_dtype=torch.uint8``) stores ``square_avg`` and ``acc_delta`` as one
uint8 code per element and one fp32 scale per ``QUANT_BLOCK`` (256) elements. A code is
an unsigned float with 4 exponent and 4 mantissa bits, subnormals included, times its
block's scale, a power of two: code ``c >= 16`` stands for
``2**((c >> 4) - 15) * (1 + (c & 15) / 16)``, ``c < 16`` for ``c * 2**-18``. The
scale is the power of two at or below the block's largest value rounded up to 5
significant bits, so every value of the block has a code, and dividing by the scale is
exact. A step stores each value rounded stochastically on its block's grid, with 16
bits of noise (unbiased to 2**-16 of a gap): to nearest, a running average that
changes by less than half a gap per step would stall. But ``square_avg``'s subnormal
codes (below 2**-14 of the scale) round up: on that coarse grid a small ``square_avg``
would often read back as 0, far below its value, and AdaDelta divides by its square
root; where an element's grads stay small, its steps then feed ``acc_delta``, which
feeds them back, without bound (under constant grads, ``acc_delta`` reached 352 in 60
steps where fp32 state's stays below 2e-5: ``tests/test_quantized_state.py``). Rounded
up, it never reads back below the value the step computed, so no step is larger than
that value gives. A block with a NaN or an inf
gets a NaN scale (so does one whose largest value rounds past fp32's range); one whose
largest value is below fp32's smallest normal (zero included), a zero scale.

The kernel (``kernels/adadelta.py``, ``_quantize``) and the C loop
(``csrc/adadelta_cpu.c``) store the same codes and scales, from the same noise
(:func:`state_noise`); :func:`quantize_` follows the same steps, for the chunked CPU
path (with noise) and for loading a state_dict (to nearest, with none). A value on the
grid keeps its value either way, so dequantizing and quantizing again gives back the
same values: the same codes and scales too, but for a block whose largest value was
rounded down under a doubled scale (from just below a power of two), which comes back
one binade lower, on the smaller scale.
"""

from __future__ import annotations

import torch

from .kernels.adadelta import QUANT_BLOCK

__all__ = ["QUANT_BLOCK", "dequantize", "quantize_", "state_noise"]

# Values decoded or encoded at a time (a multiple of QUANT_BLOCK): the int64 steps take
# ~50 B per value (13 MiB a chunk), so a whole 32M-param state at once peaked at 51 B/param on loading.
CHUNK = 1 << 18

_CODE_EXPONENT_BIAS = 112 << 23  # fp32 exponent field of 2**-15
_SMALLEST_NORMAL_CODE_BITS = 113 << 23  # fp32 bits of 2**-14
_CODE_DROPPED_MASK = (1 << 19) - 1  # the fp32 mantissa bits a code drops
_SUBNORMAL_FIXED_POINT = 2.0**34  # 2**-18 in units of 2**-16
_RINT_MAGIC = 8388608.0  # 2**23
_RINT_MAGIC_BITS = 0x4B000000
_UINT32 = 0xFFFFFFFF
# lowbias32's multipliers (the kernel's STATE_NOISE_MULTIPLIERS).
_HASH_A, _HASH_B = 0x7FEB352D, 0x846CA68B


def _times_mod_2_32(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """``x * multiplier`` mod 2**32 for int64 ``x`` < 2**32, in halves: the whole
    product can pass 2**63, where int64 would overflow."""
    low = x * (multiplier & 0xFFFF)
    high = ((x * (multiplier >> 16)) & 0xFFFF) << 16
    return (low + high) & _UINT32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 ``x`` (< 2**32), as the kernel's ``_hash32``."""
    x = x ^ (x >> 16)
    x = _times_mod_2_32(x, _HASH_A)
    x = x ^ (x >> 15)
    x = _times_mod_2_32(x, _HASH_B)
    return x ^ (x >> 16)


def state_noise(seed: int, first_index: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's 32 noise bits (``_state_noise``) of the ``n`` state elements from
    ``first_index`` on, as int64: the low half rounds square_avg, the high half acc_delta."""
    key = int(_hash32(torch.tensor(seed & _UINT32, dtype=torch.int64)))
    index = (torch.arange(n, dtype=torch.int64, device=device) + first_index + key) & _UINT32
    return _hash32(index)


def _fp32_bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of 1-D ``codes`` (uint8) whose blocks of ``QUANT_BLOCK`` have ``scales``.

    ``codes`` may end inside its last block (a param's state without its padding).
    Decoded ``CHUNK`` codes at a time, so that the int64 steps take memory of a chunk,
    not of the whole state.
    """
    values = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for start in range(0, codes.numel(), CHUNK):
        part = codes[start : start + CHUNK].to(torch.int64)
        normal = _from_bits((part << 19) + _CODE_EXPONENT_BIAS)
        decoded = torch.where(part >= 16, normal, part.to(torch.float32) * 2.0**-18)
        first_block = start // QUANT_BLOCK
        block_scales = scales[first_block : first_block + CHUNK // QUANT_BLOCK].repeat_interleave(QUANT_BLOCK)
        torch.mul(decoded, block_scales[: part.numel()], out=values[start : start + CHUNK])
    return values


def quantize_(
    values: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    noise: torch.Tensor | None = None,
    round_up_small: bool = False,
) -> None:
    """Store 1-D fp32 ``values`` as ``codes`` (uint8, the same length) and one scale per
    ``QUANT_BLOCK`` of them (``scales``, fp32), rounded on each block's grid:
    stochastically by ``noise`` (16 bits per value, int64, as a step does), or to
    nearest (ties to even) without it. ``round_up_small`` (``square_avg``'s, with
    ``noise``): the subnormal codes round up instead (noise 0xFFFF), as a step's do.

    The last block may be short: its missing elements count as padding (zeros, not
    stored). A block holding a NaN or an inf gets a NaN scale (no error).
    Quantized ``CHUNK`` values at a time, so that the int64 steps take memory of a
    chunk, not of the whole state.

    Raises:
        ValueError: ``codes``, ``scales`` or ``noise`` of another length than ``values``'.
    """
    n = values.numel()
    n_blocks = -(-n // QUANT_BLOCK)
    if scales.numel() != n_blocks or codes.numel() != n or (noise is not None and noise.numel() != n):
        raise ValueError(
            f"{n} values take {n} codes, {n_blocks} scales and {n} noise values, not {codes.numel()}, "
            f"{scales.numel()} and {n if noise is None else noise.numel()}"
        )
    values, codes, scales = values.reshape(-1), codes.view(-1), scales.view(-1)
    for start in range(0, n, CHUNK):
        first_block = start // QUANT_BLOCK
        _quantize_chunk(
            values[start : start + CHUNK],
            codes[start : start + CHUNK],
            scales[first_block : first_block + CHUNK // QUANT_BLOCK],
            None if noise is None else noise.reshape(-1)[start : start + CHUNK],
            round_up_small,
        )


def _quantize_chunk(
    values: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    noise: torch.Tensor | None,
    round_up_small: bool,
) -> None:
    """:func:`quantize_` of 1-D views, at most ``CHUNK`` values."""
    n = values.numel()
    n_blocks = -(-n // QUANT_BLOCK)
    rows = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.float32, device=values.device)
    rows[:n] = values.reshape(-1)
    rows = rows.view(n_blocks, QUANT_BLOCK)
    finite = rows.isfinite()
    not_finite = ~finite.all(dim=1)
    # AdaDelta's state is never negative; a negative value counts as 0, as in the kernel.
    rows = torch.where(finite, rows.clamp(min=0.0), 0.0)
    largest = _fp32_bits(rows.amax(dim=1))
    exponent = (largest + _CODE_DROPPED_MASK) >> 23  # rounded up: a carry moves the exponent
    # (A subnormal largest value gives scale 0, whichever way it rounds.)
    usable = ~not_finite & (largest >= 0x800000) & (exponent <= 254)
    scale = torch.where(usable, _from_bits(exponent << 23), 0.0)
    inverse = 1.0 / torch.where(usable, scale, 1.0)  # exact: a power of two
    scaled = rows * inverse[:, None]
    bits = _fp32_bits(scaled)
    if noise is None:
        # To nearest, ties to even; below 2**-14 by the magic add.
        normal = (bits + 0x3FFFF + ((bits >> 19) & 1) - _CODE_EXPONENT_BIAS) >> 19
        subnormal = _fp32_bits(scaled * 262144.0 + _RINT_MAGIC) - _RINT_MAGIC_BITS
    else:
        # The kernel's: the dropped bits plus the noise at their top 16, truncated;
        # below 2**-14, the value in 16ths of 2**-18 (truncated) plus the noise.
        padded = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.int64, device=values.device)
        padded[:n] = noise.reshape(-1)
        noise16 = padded.view(n_blocks, QUANT_BLOCK)
        normal = (bits - _CODE_EXPONENT_BIAS + (noise16 << 3)) >> 19
        small_noise = 0xFFFF if round_up_small else noise16
        subnormal = ((scaled.clamp(max=2.0**-14) * _SUBNORMAL_FIXED_POINT).to(torch.int64) + small_noise) >> 16
    code = torch.where(bits >= _SMALLEST_NORMAL_CODE_BITS, normal, subnormal)
    code = torch.where(usable[:, None], code, 0)
    codes.copy_(code.reshape(-1)[:n].to(torch.uint8).view_as(codes))
    scales.copy_(torch.where(usable | (~not_finite & (largest < 0x800000)), scale, float("nan")).view_as(scales))
