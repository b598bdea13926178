"""The 8-bit state's code, in torch ops: loading a state_dict, handing out fp32 copies.

8-bit state (``state_dtype=torch.uint8``) stores ``square_avg`` and ``acc_delta`` as one
uint8 code per element and one fp32 scale per ``QUANT_BLOCK`` (256) elements. A code is
an unsigned float with 4 exponent and 4 mantissa bits, subnormals included, times its
block's scale, a power of two: code ``c >= 16`` stands for
``2**((c >> 4) - 15) * (1 + (c & 15) / 16)``, ``c < 16`` for ``c * 2**-18``. The
scale is the power of two of the block's largest value rounded to 5 significant bits,
so every value of the block has a code, and dividing by the scale is exact: a value is
stored rounded to nearest (ties to even) on its block's grid. A block with a NaN or an
inf gets a NaN scale (so does one whose largest value rounds past fp32's range); one
whose largest value is below fp32's smallest normal (zero included), a zero scale. The kernel (``kernels/adadelta.py``, ``_quantize``) and the C loop
(``csrc/adadelta_cpu.c``) store the same codes and scales; these functions follow the
same steps, so that dequantizing and quantizing again gives back the same codes.
"""

from __future__ import annotations

import torch

from .kernels.adadelta import QUANT_BLOCK

__all__ = ["QUANT_BLOCK", "dequantize", "quantize_"]

_CODE_EXPONENT_BIAS = 112 << 23  # fp32 exponent field of 2**-15
_SMALLEST_NORMAL_CODE_BITS = 113 << 23  # fp32 bits of 2**-14
_RINT_MAGIC = 8388608.0  # 2**23
_RINT_MAGIC_BITS = 0x4B000000


def _round_bits_at_code_precision(bits: torch.Tensor) -> torch.Tensor:
    """int64 fp32 bits rounded to nearest even at the code's 4 mantissa bits."""
    return bits + 0x3FFFF + ((bits >> 19) & 1)


def _fp32_bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of 1-D ``codes`` (uint8) whose blocks of ``QUANT_BLOCK`` have ``scales``.

    ``codes`` may end inside its last block (a param's state without its padding).
    """
    c = codes.to(torch.int64)
    normal = _from_bits((c << 19) + _CODE_EXPONENT_BIAS)
    values = torch.where(c >= 16, normal, c.to(torch.float32) * 2.0**-18)
    return values * scales.repeat_interleave(QUANT_BLOCK)[: codes.numel()]


def quantize_(values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Store 1-D fp32 ``values`` as ``codes`` (uint8, the same length) and one scale per
    ``QUANT_BLOCK`` of them (``scales``, fp32), rounded to nearest on each block's grid.

    The last block may be short: its missing elements count as padding (zeros, not
    stored). Raises nothing; a block holding a NaN or an inf gets a NaN scale.
    """
    n = values.numel()
    n_blocks = -(-n // QUANT_BLOCK)
    if scales.numel() != n_blocks or codes.numel() != n:
        raise ValueError(f"{n} values take {n} codes and {n_blocks} scales, not {codes.numel()} and {scales.numel()}")
    rows = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.float32, device=values.device)
    rows[:n] = values.reshape(-1)
    rows = rows.view(n_blocks, QUANT_BLOCK)
    finite = rows.isfinite()
    not_finite = ~finite.all(dim=1)
    # AdaDelta's state is never negative; a negative value counts as 0, as in the kernel.
    rows = torch.where(finite, rows.clamp(min=0.0), 0.0)
    largest = _fp32_bits(rows.amax(dim=1))
    exponent = _round_bits_at_code_precision(largest) >> 23
    # (A subnormal largest value gives scale 0, whichever way it rounds.)
    usable = ~not_finite & (largest >= 0x800000) & (exponent <= 254)
    scale = torch.where(usable, _from_bits(exponent << 23), 0.0)
    inverse = 1.0 / torch.where(usable, scale, 1.0)  # exact: a power of two
    scaled = rows * inverse[:, None]
    bits = _fp32_bits(scaled)
    normal = (_round_bits_at_code_precision(bits) - _CODE_EXPONENT_BIAS) >> 19
    # Below 2**-14: a multiple of 2**-18, rounded half to even by the magic add.
    subnormal = _fp32_bits(scaled * 262144.0 + _RINT_MAGIC) - _RINT_MAGIC_BITS
    code = torch.where(bits >= _SMALLEST_NORMAL_CODE_BITS, normal, subnormal)
    code = torch.where(usable[:, None], code, 0)
    codes.copy_(code.reshape(-1)[:n].to(torch.uint8).view_as(codes))
    scales.copy_(torch.where(usable | (~not_finite & (largest < 0x800000)), scale, float("nan")).view_as(scales))
