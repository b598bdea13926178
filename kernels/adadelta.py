"""The fused AdaDelta update: one launch over a table of param segments.

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

The params and grads stay where the model put them: the kernel reads their
addresses from a :class:`SegmentTable`, one column per *piece* (the 16-byte-aligned
bulk of a param, or its short tail), and finds ``v``, ``u`` (and the fp32 master
copy) at the piece's offset in the optimizer's flat state. A block never spans two
pieces. Each piece names its param group's row of a small hyper-parameter table,
so params of several groups share one launch.

Each element of ``p``, ``g``, ``v`` and ``u`` is loaded once and ``p``, ``v``, ``u``
are stored once; the math runs in fp32 registers (fp64 for fp64 params). Pieces
whose param and grad are 16-byte aligned and whose length is a whole number of
16-byte vectors take a branch with alignment hints, which compiles to 128-bit
accesses; the others take the same code without hints. The square root and the
division are the correctly rounded ones (``sqrt_rn``, ``div_rn``), and FMA
contraction is switched off at launch, so every operation is rounded once: the
compiled kernel and Triton's interpreter give the same bits.

Dtype modes (the optimizer, not this kernel, decides how state is stored):

* params and grads in fp32, bf16 or fp16 against fp32 state; fp64 against fp64;
* ``master``: an fp32 master copy is read and written instead of the param, and the
  param gets the master rounded to nearest;
* ``stochastic_rounding``: the low-precision param store rounds up or down with
  probability proportional to the distance, so it is unbiased (``_round_stochastic``).
  The noise is 16 bits per element, half of one 32-bit hash per two elements of the
  flat state, keyed by a per-step seed (``_param_noise``), so no two params share noise.
* bf16 state: ``square_avg`` and ``acc_delta`` are bf16, widened exactly and stored
  rounded stochastically, from the halves of one 32-bit hash per element
  (``_state_noise``), the same hash and key at other words.
* 8-bit state: ``square_avg`` and ``acc_delta`` are uint8 codes with one fp32 scale per
  ``QUANT_BLOCK`` elements (``_dequantize``, ``_quantize``; the format is
  :mod:`triton_adadelta.quant`'s). A program's block holds whole quant blocks, so the
  new scale of each comes from a reduction in the same pass.

When ``found_inf`` is given and non-zero nothing is written, decided on the device
with no host sync. Step counts are not the kernel's business: the optimizer
advances them with one small op.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = [
    "AUTOTUNE_CONFIGS",
    "SegmentTable",
    "adadelta_kernel",
    "adadelta_step_",
    "configs_for",
    "default_config",
    "mode_constexprs",
    "size_bucket",
]

# Rows of a segment table: one int64 column per piece.
PARAM_ROW = 0  # address of the piece's first param element
GRAD_ROW = 1  # address of the piece's first grad element
STATE_ROW = 2  # offset of the piece in the flat state, in elements
NUMEL_ROW = 3  # elements in the piece
GROUP_ROW = 4  # row of the hyper-parameter table
ALIGNED_ROW = 5  # 1: param and grad 16-byte aligned and numel a multiple of STATE_ALIGNMENT
N_TABLE_ROWS = 6

# Columns of the hyper-parameter table (the state's dtype, one row per param group).
LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR = range(7)
N_HPARAMS = 8

# Block sizes and warp counts to tune over. A streaming kernel with no reuse wants
# enough bytes in flight per SM; 1024..8192 elements at 4..8 warps spans the usual
# best points for bandwidth-bound elementwise kernels on A100/H100 and MI300.
# `configs_for` keeps, per mode and warp size, those that compile to 128-bit
# accesses without spills (checked by perf/sweep.py --target, tests/test_gpu_compile.py).
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_SIZE": block_size}, num_warps=num_warps)
    for block_size in (1024, 2048, 4096, 8192)
    for num_warps in (4, 8)
    if block_size // (32 * num_warps) <= 32  # at most 32 elements per thread
]
BLOCK_SIZES = sorted({config.kwargs["BLOCK_SIZE"] for config in AUTOTUNE_CONFIGS})
# The block map of BLOCK_SIZE starts at map_starts[BLOCK_SIZE // MIN_BLOCK_SIZE].
MIN_BLOCK_SIZE = BLOCK_SIZES[0]
_MAP_SLOTS = BLOCK_SIZES[-1] // MIN_BLOCK_SIZE + 1

# All stochastic rounding's noise (_state_noise, _param_noise): "lowbias32" (C. Wellons'
# hash prospector), a bijection of 32-bit words, of a word index plus a key, the hash
# of the step's seed. For a uniform key each word is uniform, so its two 16-bit halves
# are uniform and the rounding is unbiased whatever the hash's quality.
#   bf16 and 8-bit state: word (state index mod 2**32); its low half rounds
#   square_avg, its high half acc_delta.
#   params: element i takes half i % 2 (low first) of word PARAM_NOISE_WORDS + i // 2
#   (mod 2**32), words that the state's reach only past 2**31 elements, and then for
#   other elements. One hash per two params: it replaced Philox-4x32 (7 rounds, one call
#   per 8 elements), and a bf16 step with stochastic rounding took 0.78x the time on
#   the CPU (16M params; 0.80x for 1M in cache: perf/ab_native.py,
#   perf/results/ab_native_param_noise*/).
STATE_NOISE_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_STATE_NOISE_A = tl.constexpr(STATE_NOISE_MULTIPLIERS[0])
_STATE_NOISE_B = tl.constexpr(STATE_NOISE_MULTIPLIERS[1])
PARAM_NOISE_WORDS = 1 << 31
_PARAM_NOISE_WORDS = tl.constexpr(PARAM_NOISE_WORDS)
# Each param's segment of the flat state starts at a multiple of 8 elements, and its
# aligned bulk (the kernel's aligned branch) is a multiple of 8 elements: whole 16-byte
# vectors of the params (of any dtype) and of bf16 state, and whole words of the
# params' noise.
STATE_ALIGNMENT = 8
_STATE_ALIGNMENT = tl.constexpr(STATE_ALIGNMENT)
# 8-bit state (state_dtype=torch.uint8): one fp32 scale per QUANT_BLOCK elements of the
# flat state, at index (state index) >> QUANT_BLOCK_SHIFT. Every piece starts on a
# quant block (its bulk is a multiple of QUANT_BLOCK, its tail shorter), so a block
# never holds two pieces and one program sees each of its blocks whole; every
# BLOCK_SIZE is a multiple of it.
QUANT_BLOCK_SHIFT = 8
QUANT_BLOCK = 1 << QUANT_BLOCK_SHIFT
_QUANT_BLOCK = tl.constexpr(QUANT_BLOCK)
_QUANT_BLOCK_SHIFT = tl.constexpr(QUANT_BLOCK_SHIFT)

_ELEMENT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


# The most elements per thread each mode keeps without spilling: `ptxas -v` spill
# stores + loads on sm_80 and sm_90, ScratchSize and the spill counts of the AMD
# assembly on gfx942 (perf/sweep.py --target, triton 3.9; perf/results/sweep_aot_*.json
# lists the dropped configs with their figures). gfx942 spills nothing up to 32.
#   fp32, bf16, fp16: 32, none spills.
#   stochastic rounding: 16; 32 spilled 384-416 B on sm_90 and 240-248 B on sm_80 when
#   every element made its own Philox call, and with one call per 8 elements (drawn
#   before the loads) still 24-48 B on sm_90; with today's one hash per two elements,
#   152-176 B on sm_90 (none on sm_80).
#   master weights: 8; 16 spilled 8-16 B on sm_90 (B2048_w4, B4096_w8), 32 spilled 40-48 B.
#   fp64: 8; 16 spilled 160 B on sm_90, 32 spilled 1664-3288 B on sm_80/sm_90.
_MAX_PER_THREAD = 32
_MAX_PER_THREAD_STOCHASTIC_ROUNDING = 16
_MAX_PER_THREAD_MASTER = 8
_MAX_PER_THREAD_FP64 = 8
#   bf16 state: as fp32 state (with two Philox streams for its noise it was 8: 16 spilled
#   16 B on sm_90; with one hash per element 32 spills nothing); with master weights 16
#   (8-bit and bf16 state hold fewer registers than fp32 state: none spills on sm_80 or sm_90).
#   8-bit state: 16, the fewest whose codes load and store 128-bit; none spills on sm_80
#   or sm_90, master weights included.
_MAX_PER_THREAD_QUANTIZED_STATE = 16
_MAX_PER_THREAD_MASTER_COMPRESSED_STATE = 16


def configs_for(
    param_dtype: torch.dtype,
    warp_size: int,
    *,
    master: bool = False,
    stochastic_rounding: bool = False,
    compressed_state: bool = False,
    quantized_state: bool = False,
) -> list[triton.Config]:
    """The autotune configs that keep every access 128-bit and spill nothing.

    Each thread must hold at least 16 bytes of the narrowest streamed buffer (the
    param/grad dtype, bf16 state, or 8-bit codes): bf16 at 1024 elements and 8 warps
    of 32 gets 4 elements per thread, 64-bit accesses. And each mode keeps at most as
    many elements per thread as compile without spills (see ``_MAX_PER_THREAD*``).

    Args:
        param_dtype: the params' dtype.
        warp_size: 32 (NVIDIA) or 64 (AMD CDNA).
        master: with fp32 master weights.
        stochastic_rounding: with stochastic rounding of the param stores.
        compressed_state: with bf16 state (``state_dtype=torch.bfloat16``).
        quantized_state: with 8-bit state (``state_dtype=torch.uint8``).
    """
    most = _MAX_PER_THREAD
    if param_dtype == torch.float64:
        most = _MAX_PER_THREAD_FP64
    if master:
        compressed = compressed_state or quantized_state
        most = min(most, _MAX_PER_THREAD_MASTER_COMPRESSED_STATE if compressed else _MAX_PER_THREAD_MASTER)
    if stochastic_rounding:
        most = min(most, _MAX_PER_THREAD_STOCHASTIC_ROUNDING)
    if quantized_state:
        most = min(most, _MAX_PER_THREAD_QUANTIZED_STATE)
    # The narrowest streamed buffer: the params, bf16 state or 8-bit codes.
    narrowest = _ELEMENT_BYTES[param_dtype]
    if compressed_state:
        narrowest = min(narrowest, 2)
    if quantized_state:
        narrowest = 1
    kept = []
    for config in AUTOTUNE_CONFIGS:
        per_thread = config.kwargs["BLOCK_SIZE"] // (warp_size * config.num_warps)
        if per_thread * narrowest >= 16 and per_thread <= most:
            kept.append(config)
    return kept


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}
_TORCH_DTYPES = {str(value): key for key, value in _TL_DTYPES.items()}


def _current_warp_size() -> int:
    return triton.runtime.driver.active.get_current_target().warp_size


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Autotuner hook: time only the configs that suit this dtype and device."""
    # Triton 3.6 puts only positional arguments in named_args (the launch passes none),
    # later versions all of them.
    args = {**named_args, **kwargs}
    warp_size = _current_warp_size()
    param_dtype = _TORCH_DTYPES[str(args["PARAM_DTYPE"])]
    state_dtype = args["square_avg_ptr"].dtype
    suited = configs_for(
        param_dtype, warp_size, master=args["HAS_MASTER"], stochastic_rounding=args["STOCHASTIC_ROUNDING"],
        compressed_state=state_dtype == torch.bfloat16, quantized_state=state_dtype == torch.uint8,
    )  # fmt: skip
    allowed = {(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in suited}
    return [c for c in configs if (c.kwargs["BLOCK_SIZE"], c.num_warps) in allowed] or configs


# Used when tuning is switched off, and by the interpreter (which has no driver to
# tune on), where the mode keeps it (see `default_config`).
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_NUM_WARPS = 8


def default_config(
    param_dtype: torch.dtype,
    warp_size: int,
    *,
    master: bool = False,
    stochastic_rounding: bool = False,
    compressed_state: bool = False,
    quantized_state: bool = False,
) -> triton.Config:
    """The config that runs untuned: ``DEFAULT_BLOCK_SIZE`` at ``DEFAULT_NUM_WARPS`` where
    :func:`configs_for` keeps it, else the largest kept block at those warps (fp64
    and master weights: 2048 on NVIDIA)."""
    kept = configs_for(
        param_dtype, warp_size, master=master, stochastic_rounding=stochastic_rounding,
        compressed_state=compressed_state, quantized_state=quantized_state,
    )  # fmt: skip
    return max(
        kept,
        key=lambda c: (
            c.num_warps == DEFAULT_NUM_WARPS,
            c.kwargs["BLOCK_SIZE"] <= DEFAULT_BLOCK_SIZE,
            -abs(c.kwargs["BLOCK_SIZE"] - DEFAULT_BLOCK_SIZE),
        ),
    )


PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``square_avg``/``acc_delta`` (and of the math): fp32, or fp64 for fp64 params."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def size_bucket(n_elements: int) -> int:
    """Tuning key: ``n_elements`` rounded up to a power of two, at least 2**12.

    A training run then tunes once per bucket, not once per tensor size.
    """
    return max(4096, triton.next_power_of_2(n_elements))


def mode_constexprs(param_dtype: torch.dtype, *, master: bool, stochastic_rounding: bool) -> dict[str, Any]:
    """The constexprs that name a launch's dtype mode (and its tuning key's mode part).

    ``PARAM_DTYPE_NAME`` is the param dtype's name, for the tuning key: the autotuner
    writes its key to its disk cache as JSON, which a ``tl.dtype`` is not.
    """
    return {
        "PARAM_DTYPE": _TL_DTYPES[param_dtype],
        "PARAM_DTYPE_NAME": str(_TL_DTYPES[param_dtype]),
        "HAS_MASTER": bool(master),
        "STOCHASTIC_ROUNDING": bool(stochastic_rounding),
    }


def tuning_enabled() -> bool:
    """Autotuning is on unless ``TRITON_ADADELTA_AUTOTUNE=0``."""
    return os.environ.get("TRITON_ADADELTA_AUTOTUNE", "1") != "0"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(eq=False)
class SegmentTable:
    """The pieces of params that one launch updates, and how to find them.

    Args:
        pieces: int64 ``[N_TABLE_ROWS, n_pieces]`` on the state's device (rows
            ``PARAM_ROW`` .. ``ALIGNED_ROW``), in increasing state offset.
        numels: the ``NUMEL_ROW`` on the host (for the grid and the block maps).
        param_dtype: dtype of every param and grad of the table.
        written: the tensors the launch writes through their addresses (the params,
            or their contiguous stand-ins); kept alive, and restored while tuning.
        read: the tensors it only reads (the grads, or contiguous copies); kept alive.
            Empty where each is the grad of its param, ``written[k].grad`` (then
            the params keep them alive). Pieces come in pairs: piece ``2k`` is the
            bulk and ``2k + 1`` the tail of ``written[k]``/``read[k]`` (the tail
            starts at element ``numels[2k]``).
        cache: shared by the tables of the same pieces (their block map is the same).
    """

    pieces: torch.Tensor
    numels: torch.Tensor
    param_dtype: torch.dtype
    written: list[torch.Tensor]
    read: list[torch.Tensor]
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_pieces(self) -> int:
        return self.pieces.shape[1]

    @property
    def device(self) -> torch.device:
        return self.pieces.device

    def n_elements(self) -> int:
        return int(self.numels.sum())

    def block_map(self) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """The ``(piece, block in piece)`` of every program, for every block size.

        Returns:
            The int32 pairs of all block sizes one after another, an int64 tensor of
            where each block size's map starts (at ``BLOCK_SIZE // MIN_BLOCK_SIZE``),
            and the number of programs of each block size. Built once per table.
        """
        if "block_map" not in self.cache:
            # Plain lists: torch.repeat_interleave took 5-8 ms a call here, more than
            # these loops over a few thousand blocks (built once per set of pieces).
            numels = self.numels.tolist()
            pairs: list[int] = []
            starts, counts = [0] * _MAP_SLOTS, {}
            for block_size in BLOCK_SIZES:
                starts[block_size // MIN_BLOCK_SIZE] = len(pairs) // 2
                for piece, numel in enumerate(numels):
                    for block in range(-(-numel // block_size)):
                        pairs += (piece, block)
                counts[block_size] = len(pairs) // 2 - starts[block_size // MIN_BLOCK_SIZE]
            self.cache["block_map"] = (
                torch.tensor(pairs, dtype=torch.int32).to(self.device),
                torch.tensor(starts, dtype=torch.int64).to(self.device),
                counts,
            )
        return self.cache["block_map"]


# The tensors a tuning launch writes through table addresses: they are not kernel
# arguments, so the autotuner cannot name them in `restore_value`.
_tuning = threading.local()


def _save_written(kwargs: dict[str, Any], reset_only: bool = False) -> None:
    """Autotuner pre-hook: copy every buffer a trial writes (never zero one)."""
    if reset_only:
        return
    names = ("square_avg_ptr", "acc_delta_ptr", "master_ptr", "square_avg_scale_ptr", "acc_delta_scale_ptr")
    buffers = [kwargs[name] for name in names if kwargs[name] is not None]
    buffers += getattr(_tuning, "written", [])
    _tuning.saved = [(buffer, buffer.clone()) for buffer in buffers]


def _restore_written(kwargs: dict[str, Any], exception: BaseException | None) -> None:
    """Autotuner post-hook: put every written buffer back, so each trial starts alike."""
    for buffer, saved in getattr(_tuning, "saved", []):
        buffer.copy_(saved)
    _tuning.saved = []


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
def _bf16_add_and_truncate(x, addend):
    """The top half of fp32 ``x``'s bits after adding ``addend`` (uint32) below it:
    bf16's rounding, to nearest or stochastic by the addend. A NaN stays a (quiet)
    NaN instead of carrying into the exponent or the sign."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, (bits >> 16) | 0x40, (bits + addend) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to_nearest(x, DTYPE: tl.constexpr):
    """Round to nearest even in DTYPE; bf16 by integer ops.

    The interpreter converts fp32 to bf16 by truncation; the integer form is the
    same correct rounding on a GPU and in the interpreter (it is c10's bf16 rounding).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        return _bf16_add_and_truncate(x, 0x7FFF + ((bits >> 16) & 1))
    else:
        return x.to(DTYPE)


@triton.jit
def _hash32(x):
    """lowbias32 of uint32 ``x``: a bijection whose every output bit depends on every input bit."""
    # (uint32 multipliers: a literal past 2**31 would widen the product to int64.)
    x = x ^ (x >> 16)
    x = x * tl.full([], _STATE_NOISE_A, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], _STATE_NOISE_B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _noise_key(seed):
    """The noise's key: the hash of the step's seed (mod 2**32)."""
    return _hash32(seed.to(tl.uint32))


@triton.jit
def _state_noise(seed, state_offs):
    """Compressed state's 32 random bits per element: the low half rounds square_avg,
    the high half acc_delta. The hash of the element's state index (mod 2**32) plus the
    key; the same in the C loop (``hash32`` in ``csrc/adadelta_cpu.c``)."""
    return _hash32(state_offs.to(tl.uint32) + _noise_key(seed))


@triton.jit
def _param_words(seed, pairs):
    """The params' noise words of the element pairs ``pairs`` (state index // 2)."""
    return _hash32(pairs.to(tl.uint32) + tl.full([], _PARAM_NOISE_WORDS, tl.uint32) + _noise_key(seed))


@triton.jit
def _param_noise(seed, index):
    """16 uniform random bits (as uint32) for the param at ``index`` of the flat state:
    half ``index % 2`` (low half first) of its pair's word. 16 bits are what rounding
    fp32 to bf16 drops, so the rounding is exactly unbiased."""
    word = _param_words(seed, index >> 1)
    return tl.where((index & 1) == 0, word & 0xFFFF, word >> 16)


@triton.jit
def _param_noise_contiguous(seed, first_index, BLOCK: tl.constexpr):
    """``_param_noise`` of the ``BLOCK`` indices from ``first_index`` (even) on, as its
    ``BLOCK // 2`` words: one hash per two elements, kept packed until the rounding
    needs them (``_param_noise_halves``)."""
    return _param_words(seed, (first_index >> 1) + tl.arange(0, BLOCK // 2))


@triton.jit
def _param_noise_halves(words, BLOCK: tl.constexpr):
    """The ``BLOCK`` 16-bit noises of ``_param_noise_contiguous``'s words: element 2k + h
    (row-major) is half h of word k, as ``_param_noise`` numbers them."""
    halves = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(halves, [BLOCK])


@triton.jit
def _noise(seed, state_offs, noise_base, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """The params' noise for the elements at ``state_offs``: packed words
    (``_param_noise_contiguous``) where CONTIGUOUS, else 16 bits per element."""
    if CONTIGUOUS:
        return _param_noise_contiguous(seed, noise_base, BLOCK)
    else:
        return _param_noise(seed, state_offs)


@triton.jit
def _noise_halves(noise, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """``_noise``'s 16 bits per element, unpacked where packed."""
    if CONTIGUOUS:
        return _param_noise_halves(noise, BLOCK)
    else:
        return noise


@triton.jit
def _round_stochastic(x, noise16, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to DTYPE up or down in magnitude, given 16 random bits.

    bf16: add the bits below the 16 kept ones and truncate, so ``x`` rounds away
    from zero with probability (dropped bits) / 2**16, exactly, and its expectation
    is ``x``. fp16: the neighbour beyond or short of the nearest, with probability
    (distance to the nearest) / (gap), against ``noise16 / 2**16``.
    """
    if DTYPE == tl.bfloat16:
        return _bf16_add_and_truncate(x, noise16)
    else:
        nearest = _round_to_nearest(x, DTYPE)
        nearest_value = _widen(nearest, tl.float32)
        # The other neighbour of `x`: the magnitude bits one up when |x| lies beyond
        # |nearest|, one down when it lies short of it.
        beyond = tl.abs(x) > tl.abs(nearest_value)
        other_bits = nearest.to(tl.int16, bitcast=True) + tl.where(beyond, 1, -1).to(tl.int16)
        other = other_bits.to(DTYPE, bitcast=True)
        # (Exact values give fraction 0, or NaN for a NaN gap: both keep nearest.)
        fraction = _div(x - nearest_value, _widen(other, tl.float32) - nearest_value)
        return tl.where(noise16.to(tl.float32) * (1.0 / 65536.0) < fraction, other, nearest)


# The 8-bit code: an unsigned float with 4 exponent and 4 mantissa bits (with
# subnormals), times its quant block's power-of-two scale. Code c >= 16 stands for
# 2**((c >> 4) - 15) * (1 + (c & 15) / 16), code c < 16 for c * 2**-18: 0 is 0, 240
# is 1 and 255 is 1.9375, with 4 significant bits from 1.9375 down to 2**-14.
_CODE_EXPONENT_BIAS = tl.constexpr(112 << 23)  # fp32 exponent field of 2**-15
_SMALLEST_NORMAL_CODE_BITS = tl.constexpr(113 << 23)  # fp32 bits of 2**-14
_SUBNORMAL_FIXED_POINT = tl.constexpr(17179869184.0)  # 2**34: 2**-18 in units of 2**-16
_CODE_DROPPED_MASK = tl.constexpr((1 << 19) - 1)  # the fp32 mantissa bits a code drops
_SMALLEST_NORMAL_CODE = tl.constexpr(2.0**-14)


@triton.jit
def _code_values(codes):
    """The code's value before its block's scale (exact in fp32).

    A code is an fp16's top 10 bits: the same exponent bias, and subnormals below
    2**-14 too. So the fp16 of bits ``code << 6``, widened, is its value: one shift
    and one exact conversion, where the two cases' formulas and a select took six
    instructions (the C loop decodes so with F16C)."""
    return (codes.to(tl.uint16) << 6).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize(codes, scale, BLOCK: tl.constexpr):
    """fp32 values of ``BLOCK`` codes: rows of ``QUANT_BLOCK``, each times its ``scale``."""
    rows = tl.reshape(codes, [BLOCK // _QUANT_BLOCK, _QUANT_BLOCK])
    return tl.reshape(_code_values(rows) * scale[:, None], [BLOCK])


@triton.jit
def _quantize(values, noise16, mask, BLOCK: tl.constexpr, ROUND_UP: tl.constexpr):
    """fp32 ``values`` as ``(codes, scales)``: one scale per quant block, each value
    rounded stochastically on its block's grid by 16 bits of noise (``mask``: the
    values that count); with ``ROUND_UP`` (``square_avg``'s), the subnormal codes
    (below 2**-14 of the scale) round up instead (noise 0xFFFF; see ``quant.py``).

    The scale is the power of two at or below the block's largest value rounded up
    to the code's 5 significant bits, so no value rounds past code 255, and
    ``values / scale`` is exact. A value rounds up to the next grid value with
    probability (its distance above the one below) / (the gap), to 2**-16 of a gap:
    unbiased, so a running average that changes by less than a gap per step still
    moves in expectation, where rounding to nearest would stall it. A block with a
    NaN or inf gets a NaN scale (every value reads back NaN); one whose largest
    value is below fp32's smallest normal, or zero, gets scale 0 and codes 0.
    """
    rows = tl.reshape(values, [BLOCK // _QUANT_BLOCK, _QUANT_BLOCK]).to(tl.int32, bitcast=True)
    valid = tl.reshape(mask, [BLOCK // _QUANT_BLOCK, _QUANT_BLOCK])
    noise = tl.reshape(noise16, [BLOCK // _QUANT_BLOCK, _QUANT_BLOCK])
    # On the bits: a non-negative fp32 orders as its bits do, as int32. A NaN or an inf
    # (either sign) counts as 0x7F800000, above every finite value, so one reduction
    # gives both the largest value and whether the block has a non-finite one.
    not_finite = (rows & 0x7FFFFFFF) >= 0x7F800000
    # AdaDelta's state is never negative; a negative value (none arises) counts as 0.
    rows = tl.where(valid & ~not_finite, tl.maximum(rows, 0), 0)
    top = tl.max(tl.where(valid & not_finite, 0x7F800000, rows), axis=1)
    largest = top.to(tl.uint32)
    finite = top < 0x7F800000
    exponent = (largest + _CODE_DROPPED_MASK) >> 23  # rounded up: a carry moves the exponent
    # (A subnormal largest value gives scale 0, whichever way it rounds.)
    usable = finite & (largest >= 0x800000) & (exponent <= 254)
    scale = tl.where(usable, (exponent << 23).to(tl.float32, bitcast=True), 0.0)
    # 1 / scale, exactly and without a division: 2**(127 - e) for scale 2**(e - 127),
    # 2**-127 (a subnormal) for the largest scale; 1 where there are no codes.
    inverse_bits = tl.where(exponent <= 253, (254 - exponent) << 23, 0x400000)
    inverse = tl.where(usable, inverse_bits, 0x3F800000).to(tl.float32, bitcast=True)
    scaled = rows.to(tl.float32, bitcast=True) * inverse[:, None]
    bits = scaled.to(tl.uint32, bitcast=True)
    # The 19 dropped bits plus the noise (at their top 16), truncated.
    normal = (bits - _CODE_EXPONENT_BIAS + (noise << 3)) >> 19
    # Below 2**-14: multiples of 2**-18; the value in 16ths of 2**-18 (truncated), plus the noise.
    # (Clamped first: the conversion of a normal value's product would overflow.)
    small_noise = 0xFFFF if ROUND_UP else noise
    subnormal = ((tl.minimum(scaled, _SMALLEST_NORMAL_CODE) * _SUBNORMAL_FIXED_POINT).to(tl.uint32) + small_noise) >> 16
    codes = tl.where(bits >= _SMALLEST_NORMAL_CODE_BITS, normal, subnormal)
    codes = tl.where(usable[:, None], codes, 0).to(tl.uint8)
    scale = tl.where(usable | (finite & (largest < 0x800000)), scale, float("nan"))
    return tl.reshape(codes, [BLOCK]), scale


@triton.jit
def _update_block(
    # pointers: the piece's param and grad, and its place in the flat state
    param_ptr,
    grad_ptr,
    square_avg_ptr,
    acc_delta_ptr,
    master_ptr,
    square_avg_scale_ptr,
    acc_delta_scale_ptr,
    # where: element offsets within the piece, the mask, and the state index of offs[0]
    offs,
    mask,
    state_offs,
    block_base,
    first_offs,
    numel,
    # hyper-parameters (compute dtype scalars)
    lr,
    rho,
    one_minus_rho,
    eps,
    weight_decay,
    maximize,
    grad_scale,
    seed,
    # meta-parameters
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    CONTIGUOUS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Noise is drawn before the loads: the hash's temporaries die before the streams'
    # values live. (state_offs is block_base + arange(BLOCK); CONTIGUOUS_NOISE:
    # block_base is a multiple of 8.)
    if STOCHASTIC_ROUNDING:
        noise = _noise(seed, state_offs, block_base, CONTIGUOUS_NOISE, BLOCK)
    COMPRESSED_STATE: tl.constexpr = square_avg_ptr.dtype.element_ty == tl.bfloat16
    # 8-bit state: the block holds whole quant blocks (block_base a multiple of
    # QUANT_BLOCK); a quant block is the piece's if its first element is.
    QUANTIZED_STATE: tl.constexpr = square_avg_ptr.dtype.element_ty == tl.uint8
    if QUANTIZED_STATE:
        rows = tl.arange(0, BLOCK // _QUANT_BLOCK)
        scale_index = (block_base >> _QUANT_BLOCK_SHIFT) + rows
        row_valid = first_offs + rows * _QUANT_BLOCK < numel
    if HAS_MASTER:
        param = tl.load(master_ptr + state_offs, mask=mask).to(COMPUTE_DTYPE)
    else:
        param = _widen(tl.load(param_ptr + offs, mask=mask), COMPUTE_DTYPE)
    grad = _widen(tl.load(grad_ptr + offs, mask=mask), COMPUTE_DTYPE)
    if QUANTIZED_STATE:
        # (Every access in this function, not in a helper: the AOT check finds each
        # branch's accesses by their call site in the kernel.)
        square_avg_scale = tl.load(square_avg_scale_ptr + scale_index, mask=row_valid, other=0.0)
        acc_delta_scale = tl.load(acc_delta_scale_ptr + scale_index, mask=row_valid, other=0.0)
        square_avg = _dequantize(tl.load(square_avg_ptr + state_offs, mask=mask, other=0), square_avg_scale, BLOCK)
        acc_delta = _dequantize(tl.load(acc_delta_ptr + state_offs, mask=mask, other=0), acc_delta_scale, BLOCK)
    else:
        square_avg = _widen(tl.load(square_avg_ptr + state_offs, mask=mask), COMPUTE_DTYPE)
        acc_delta = _widen(tl.load(acc_delta_ptr + state_offs, mask=mask), COMPUTE_DTYPE)

    if HAS_GRAD_SCALE:
        grad = _div(grad, grad_scale)
    if maximize != 0:
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

    if COMPRESSED_STATE:
        # bf16 state: rounded stochastically, so that its expectation is the fp32 value.
        state_noise = _state_noise(seed, state_offs)
        square_avg = _round_stochastic(square_avg, state_noise & 0xFFFF, tl.bfloat16)
        acc_delta = _round_stochastic(acc_delta, state_noise >> 16, tl.bfloat16)
    if QUANTIZED_STATE:
        # 8-bit state: rounded stochastically on each quant block's grid, with bf16
        # state's noise (the halves of one hash per element).
        state_noise = _state_noise(seed, state_offs)
        square_avg_codes, square_avg_scale = _quantize(square_avg, state_noise & 0xFFFF, mask, BLOCK, True)
        acc_delta_codes, acc_delta_scale = _quantize(acc_delta, state_noise >> 16, mask, BLOCK, False)
        tl.store(square_avg_ptr + state_offs, square_avg_codes, mask=mask)
        tl.store(acc_delta_ptr + state_offs, acc_delta_codes, mask=mask)
        tl.store(square_avg_scale_ptr + scale_index, square_avg_scale, mask=row_valid)
        tl.store(acc_delta_scale_ptr + scale_index, acc_delta_scale, mask=row_valid)
    else:
        tl.store(square_avg_ptr + state_offs, square_avg.to(square_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(acc_delta_ptr + state_offs, acc_delta.to(acc_delta_ptr.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + state_offs, param.to(master_ptr.dtype.element_ty), mask=mask)
    if STOCHASTIC_ROUNDING:
        rounded = _round_stochastic(param, _noise_halves(noise, CONTIGUOUS_NOISE, BLOCK), param_ptr.dtype.element_ty)
        tl.store(param_ptr + offs, rounded, mask=mask)
    else:
        tl.store(param_ptr + offs, _round_to_nearest(param, param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_piece(
    table_ptr,
    n_pieces,
    piece,
    found_inf_ptr,
    PARAM_DTYPE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    ALIGNMENT: tl.constexpr = _STATE_ALIGNMENT,
):
    """A piece's param and grad pointers, state offset and length, read from the table.

    With ``ALIGNED`` the values carry the promises the table keeps for an aligned
    piece: 16-byte aligned param and grad, a state offset and a length in whole
    vectors (multiples of ``ALIGNMENT``: ``QUANT_BLOCK`` for 8-bit state). They give 128-bit accesses. ``tl.multiple_of`` marks the op that made a
    value, wherever the value is used, so the aligned branch loads its own copies:
    hints on values shared with the other branch reached it too, the compiler merged
    the two branches, and unaligned pieces and tails got 128-bit accesses (checked in
    the sm_90 PTX with triton 3.9).
    """
    # Rows PARAM_ROW .. NUMEL_ROW of the table (module globals cannot be read here).
    param_ptr = tl.load(table_ptr + 0 * n_pieces + piece).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(table_ptr + 1 * n_pieces + piece).to(tl.pointer_type(PARAM_DTYPE))
    state_offset = tl.load(table_ptr + 2 * n_pieces + piece)
    numel = tl.load(table_ptr + 3 * n_pieces + piece)
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        state_offset = tl.multiple_of(state_offset, ALIGNMENT)
        numel = tl.multiple_of(numel, ALIGNMENT)
    if HAS_FOUND_INF:
        # A GradScaler that found inf/NaN skips the step on the device: with no
        # elements left in range every load and store is masked off.
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    return param_ptr, grad_ptr, state_offset, numel


@triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    # The mode is in the key: the configs tried (and the best) differ by mode, and
    # the autotuner's own key holds the tensors' dtypes only, which fp32, bf16 and
    # fp16 params (fp32 state), with or without stochastic rounding, share. Every
    # value is plain JSON (the dtype by name), as the results cache writes it.
    key=["size_bucket", "PARAM_DTYPE_NAME", "HAS_MASTER", "STOCHASTIC_ROUNDING"],
    # Tuning runs the in-place kernel once per config. What it writes is the state
    # (arguments) and the params (reached through the table): the hooks copy both
    # before each trial and put them back after it. Nothing is ever zeroed.
    pre_hook=_save_written,
    post_hook=_restore_written,
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)
# A seed of 1 would otherwise be specialized into a constant (triton 3.6 does), which
# the noise's `seed.to(...)` cannot take.
@triton.jit(do_not_specialize=["seed"])
def adadelta_kernel(
    # segment table
    table_ptr,
    block_map_ptr,
    map_starts_ptr,
    # state (flat, the optimizer's own)
    square_avg_ptr,
    acc_delta_ptr,
    master_ptr,
    square_avg_scale_ptr,  # 8-bit state: one fp32 scale per QUANT_BLOCK (else None)
    acc_delta_scale_ptr,
    # hyper-parameters
    hparams_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    seed,
    # sizes
    n_pieces,
    size_bucket,
    # meta-parameters
    PARAM_DTYPE: tl.constexpr,
    PARAM_DTYPE_NAME: tl.constexpr,  # the tuning key's (see mode_constexprs)
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    N_HPARAMS: tl.constexpr,
    MIN_BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    # Which piece this program updates, and which block of it.
    entry = block_map_ptr + 2 * (tl.load(map_starts_ptr + BLOCK_SIZE // MIN_BLOCK_SIZE) + pid)
    piece = tl.load(entry).to(tl.int64)
    block = tl.load(entry + 1).to(tl.int64)
    group = tl.load(table_ptr + 4 * n_pieces + piece)  # GROUP_ROW
    aligned = tl.load(table_ptr + 5 * n_pieces + piece)  # ALIGNED_ROW
    # int64 throughout, so that a buffer past 2**31 elements addresses correctly.
    offs = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)

    # fp32, or fp64 for fp64 params: the hyper-parameters' dtype (the state may be bf16).
    compute_ty: tl.constexpr = hparams_ptr.dtype.element_ty
    row = hparams_ptr + group * N_HPARAMS
    lr = tl.load(row + 0)
    rho = tl.load(row + 1)
    one_minus_rho = tl.load(row + 2)
    eps = tl.load(row + 3)
    weight_decay = tl.load(row + 4)
    maximize = tl.load(row + 5)
    grad_scale = tl.full((), 1.0, compute_ty)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(compute_ty)

    # Each branch reads the piece itself (see _load_piece): the hints of the aligned
    # branch must not reach the other.
    if aligned != 0:
        # 8-bit state's pieces start and end on quant blocks: 16 codes are 128 bits.
        quantized: tl.constexpr = square_avg_ptr.dtype.element_ty == tl.uint8
        param_ptr, grad_ptr, state_offset, numel = _load_piece(
            table_ptr, n_pieces, piece, found_inf_ptr, PARAM_DTYPE, HAS_FOUND_INF, True,
            _QUANT_BLOCK if quantized else _STATE_ALIGNMENT,
        )  # fmt: skip
        _update_block(
            param_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, master_ptr, square_avg_scale_ptr, acc_delta_scale_ptr,
            offs, offs < numel, state_offset + offs,
            state_offset + block * BLOCK_SIZE,  # a multiple of STATE_ALIGNMENT
            block * BLOCK_SIZE, numel,
            lr, rho, one_minus_rho, eps, weight_decay, maximize, grad_scale, seed,
            HAS_MASTER, STOCHASTIC_ROUNDING, HAS_GRAD_SCALE, compute_ty, True, BLOCK_SIZE,
        )  # fmt: skip
    else:
        param_ptr, grad_ptr, state_offset, numel = _load_piece(
            table_ptr, n_pieces, piece, found_inf_ptr, PARAM_DTYPE, HAS_FOUND_INF, False
        )
        # Scalar accesses take a 64-bit address per element: a whole block at once
        # held twice the registers of the aligned branch, and a kernel gets the
        # registers of its hungrier branch. Sub-blocks keep this branch below the other.
        for start in tl.static_range(0, BLOCK_SIZE, MIN_BLOCK_SIZE):
            sub_offs = block * BLOCK_SIZE + start + tl.arange(0, MIN_BLOCK_SIZE)
            _update_block(
                param_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, master_ptr, square_avg_scale_ptr,
                acc_delta_scale_ptr, sub_offs, sub_offs < numel, state_offset + sub_offs,
                state_offset + block * BLOCK_SIZE + start, block * BLOCK_SIZE + start, numel,
                lr, rho, one_minus_rho, eps, weight_decay, maximize, grad_scale, seed,
                HAS_MASTER, STOCHASTIC_ROUNDING, HAS_GRAD_SCALE, compute_ty, False, MIN_BLOCK_SIZE,
            )  # fmt: skip


def _check_scalar_tensor(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.numel() != 1:
        raise ValueError(f"{name} must have one element, got {value.numel()}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the state is on {device}")


def check_quantized_state(
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    square_avg_scale: torch.Tensor | None,
    acc_delta_scale: torch.Tensor | None,
) -> None:
    """Check 8-bit state's buffers against each other: codes of a whole number of quant
    blocks, and one fp32 scale per block in each scale buffer (both backends; the C
    loop writes through them).

    Raises:
        ValueError: naming what does not fit.
    """
    if square_avg.numel() % QUANT_BLOCK:
        raise ValueError(f"8-bit state has a whole number of {QUANT_BLOCK}-element blocks, not {square_avg.numel()} elements")
    if acc_delta.dtype != torch.uint8 or acc_delta.numel() != square_avg.numel():
        raise ValueError(f"acc_delta must be uint8 of {square_avg.numel()} elements, as square_avg is")
    for name, scale in (("square_avg_scale", square_avg_scale), ("acc_delta_scale", acc_delta_scale)):
        if scale is None or scale.dtype != torch.float32 or scale.dim() != 1 or not scale.is_contiguous():
            raise ValueError(f"8-bit state needs {name}: a 1-D contiguous fp32 buffer, one scale per {QUANT_BLOCK} elements")
        if scale.numel() != square_avg.numel() // QUANT_BLOCK or scale.device != square_avg.device:
            raise ValueError(
                f"{name} has {scale.numel()} scales on {scale.device}; the state needs "
                f"{square_avg.numel() // QUANT_BLOCK} on {square_avg.device}"
            )


def check_launch(
    table: SegmentTable,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    hparams: torch.Tensor,
    master: torch.Tensor | None,
    stochastic_rounding: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
) -> None:
    """Check that a table, its state and its hyper-parameters fit together (both backends).

    Raises:
        ValueError: naming what does not fit.
    """
    device = square_avg.device
    param_dtype = table.param_dtype
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param dtype {param_dtype} is not supported; use one of {PARAM_DTYPES}")
    state_dtype = state_dtype_for(param_dtype)
    if square_avg.dtype in (torch.bfloat16, torch.uint8) and param_dtype != torch.float64:
        state_dtype = square_avg.dtype  # bf16 or 8-bit state (the math stays fp32)
    if state_dtype == torch.uint8:
        check_quantized_state(square_avg, acc_delta, square_avg_scale, acc_delta_scale)
        # Once per set of pieces (the cache is theirs): on a GPU the check reads the
        # device. (Meta tensors hold no values to check, and their launch updates nothing.)
        if device.type != "meta" and not table.cache.get("starts_on_quant_blocks"):
            bad_offsets = (table.pieces[STATE_ROW] % QUANT_BLOCK != 0) & (table.pieces[NUMEL_ROW] > 0)
            if bool(bad_offsets.any()):
                raise ValueError(f"8-bit state: every piece of the table must start on a multiple of {QUANT_BLOCK} elements")
            table.cache["starts_on_quant_blocks"] = True
    elif square_avg_scale is not None or acc_delta_scale is not None:
        raise ValueError("square_avg_scale and acc_delta_scale are for 8-bit (torch.uint8) state only")
    buffers = {"square_avg": square_avg, "acc_delta": acc_delta}
    if master is not None:
        buffers["master"] = master
    for name, buffer in buffers.items():
        if buffer.device != device:
            raise ValueError(f"{name} is on {buffer.device} but square_avg is on {device}")
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(f"{name} must be a 1-D contiguous buffer, got shape {tuple(buffer.shape)}")
        if buffer.numel() != square_avg.numel():
            raise ValueError(f"{name} has {buffer.numel()} elements but square_avg has {square_avg.numel()}")
        if buffer.dtype != (torch.float32 if name == "master" else state_dtype):
            raise ValueError(f"{name} must not be {buffer.dtype} for {param_dtype} params")
    if master is not None and param_dtype not in LOW_PRECISION:
        raise ValueError(f"master weights are for bf16/fp16 params, not {param_dtype}")
    if stochastic_rounding and (param_dtype not in LOW_PRECISION or master is not None):
        raise ValueError("stochastic_rounding is for bf16/fp16 params without master weights")
    if table.pieces.device != device or table.pieces.dtype != torch.int64 or table.pieces.shape[0] != N_TABLE_ROWS:
        raise ValueError(f"the segment table must be int64 [{N_TABLE_ROWS}, n_pieces] on {device}")
    compute_dtype = state_dtype_for(param_dtype)
    if hparams.device != device or hparams.dtype != compute_dtype or hparams.dim() != 2 or hparams.shape[1] != N_HPARAMS:
        raise ValueError(f"hparams must be {compute_dtype} [n_groups, {N_HPARAMS}] on {device}")
    for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if value is not None:
            _check_scalar_tensor(name, value, device)


def adadelta_step_(
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
) -> None:
    """Apply one AdaDelta step in place to every piece of ``table``, in one kernel launch.

    Args:
        table: the pieces: addresses of params and grads, state offsets, lengths,
            hyper-parameter rows and alignment (:class:`SegmentTable`).
        square_avg, acc_delta: the flat state, fp32 (fp64 for fp64 params), bf16, or
            uint8 codes (8-bit state, with ``square_avg_scale`` and ``acc_delta_scale``,
            one fp32 scale per ``QUANT_BLOCK`` elements); updated in place.
        hparams: ``[n_groups, N_HPARAMS]`` in the state's dtype: lr, rho, 1 - rho,
            eps, weight decay and maximize (0/1) of each param group.
        master: optional flat fp32 master copy of low-precision params, updated in
            place; the params then receive the master rounded to nearest.
        stochastic_rounding: round low-precision param stores stochastically.
        seed: seed of the stochastic rounding.
        grad_scale: optional 1-element tensor the gradient is divided by.
        found_inf: optional 1-element tensor; when non-zero nothing is written.

    Raises:
        ValueError: if the buffers do not fit together or the device cannot run Triton.
    """
    check_launch(
        table, square_avg, acc_delta, hparams, master, stochastic_rounding, grad_scale, found_inf,
        square_avg_scale, acc_delta_scale,
    )  # fmt: skip
    device = square_avg.device
    if device.type == "cpu" and not interpreter_enabled():
        raise ValueError("CPU buffers run the Triton kernel only with TRITON_INTERPRET=1")
    if device.type != "cpu" and type(adadelta_kernel.fn).__name__ == "InterpretedFunction":
        # The interpreter runs on the host: it would read the device's params through
        # the table's raw addresses, and crash the process.
        raise RuntimeError(
            f"TRITON_INTERPRET=1 was set when the kernel was imported, and Triton's interpreter "
            f"cannot reach {device} params: unset it to run the compiled kernel, or keep the model on the CPU"
        )
    if table.n_pieces == 0 or square_avg.numel() == 0:
        return  # (a state of empty params only: nothing to update, and no buffer has an address)
    block_map, map_starts, programs = table.block_map()
    args = dict(
        table_ptr=table.pieces,
        block_map_ptr=block_map,
        map_starts_ptr=map_starts,
        square_avg_ptr=square_avg,
        acc_delta_ptr=acc_delta,
        master_ptr=master,
        square_avg_scale_ptr=square_avg_scale,
        acc_delta_scale_ptr=acc_delta_scale,
        hparams_ptr=hparams,
        grad_scale_ptr=grad_scale,
        found_inf_ptr=found_inf,
        seed=seed,
        n_pieces=table.n_pieces,
        size_bucket=size_bucket(table.n_elements()),
        **mode_constexprs(table.param_dtype, master=master is not None, stochastic_rounding=stochastic_rounding),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        N_HPARAMS=N_HPARAMS,
        MIN_BLOCK_SIZE=MIN_BLOCK_SIZE,
        # Each operation rounded once, as the interpreter does (see the module docstring).
        enable_fp_fusion=False,
    )

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (programs[meta["BLOCK_SIZE"]],)

    if tuning_enabled() and not interpreter_enabled():
        _tuning.written = table.written
        try:
            with _device_guard(device):
                adadelta_kernel[grid](**args)
        finally:
            _tuning.written = []
    else:
        # The autotuner needs a GPU driver to time configs: use the heuristic config
        # (the interpreter runs NVIDIA's).
        warp_size = 32 if device.type == "cpu" else triton.runtime.driver.active.get_current_target().warp_size
        config = default_config(
            table.param_dtype, warp_size, master=master is not None, stochastic_rounding=bool(stochastic_rounding),
            compressed_state=square_avg.dtype == torch.bfloat16, quantized_state=square_avg.dtype == torch.uint8,
        )  # fmt: skip
        with _device_guard(device):
            adadelta_kernel.fn[grid](**args, BLOCK_SIZE=config.kwargs["BLOCK_SIZE"], num_warps=config.num_warps)


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Launch on the buffers' device, whichever device is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
