"""uint8 block-quantized state on the CPU path (``state_dtype=torch.uint8``).

``square_avg`` and ``acc_delta`` are one uint8 code per element and one fp32 scale per
``QUANT_BLOCK`` (256) elements of the flat state. A code ``c`` stands for
``2**((c >> 4) - 15) * (1 + (c & 15) / 16)`` (``c >= 16``) or ``c * 2**-18`` (below),
times its block's scale; encoding a block picks the power-of-two scale of its max
rounded up to 5 significant bits (fp32 bits; 0 for a max below 2**-126, NaN for a NaN
or an inf), and rounds each value to one of its two neighbouring codes, up when the
element's 16 bits of noise plus its distance above the lower one in 2**-16ths of the
gap (truncated) reach 2**16. The noise is the kernel's: lowbias32 of the element's
state index plus the hash of the seed, its low half for square_avg and its high half
for acc_delta. Here a reference written from that definition (numpy: each code found
by searching the 256 values, not by the C loop's bit tricks) checks the C loop's codes
and scales bit for bit, the update between decode and encode being the fp32-state
loop's. The C loop must also give the same bits on any number of threads (a quant
block is never split between two), the chunked torch ops (no C compiler) the C loop's
bits with torch's sqrt, and the C loop the kernel's (Triton's interpreter).
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Callable

import numpy as np
import pytest
import torch

from triton_adadelta import cpu
from triton_adadelta.flat import hparams_table, table_for_tensors
from triton_adadelta.kernels.adadelta import LR, NUMEL_ROW, QUANT_BLOCK, STATE_ROW, SegmentTable, adadelta_step_

NAN_SCALE_BITS = 0x7FC00000  # the quiet NaN a block with a NaN or an inf gets as its scale
STORES = {"nearest": {}, "master": {"master": True}, "stochastic": {"stochastic_rounding": True}}
# (param dtype, store) pairs the C loop runs with uint8 state.
MODES = [(torch.float32, "nearest")] + [
    (dtype, store) for dtype in (torch.bfloat16, torch.float16) for store in ("nearest", "master", "stochastic")
]
MODE_IDS = [f"{str(dtype).removeprefix('torch.')}-{store}" for dtype, store in MODES]


# ------------------------------------------------------------------------ reference


def _code_values() -> np.ndarray:
    """The 256 codes' values before their block's scale (float64, exact)."""
    c = np.arange(256)
    return np.where(c >= 16, 2.0 ** ((c >> 4) - 15) * (1 + (c & 15) / 16), (c & 15) * 2.0**-18)


CODE_VALUES = _code_values()


def decode(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp32 values of flat ``codes`` whose blocks of QUANT_BLOCK have ``scales`` (fp32)."""
    block_scales = np.repeat(scales.astype(np.float64), QUANT_BLOCK)[: codes.size]
    # Exact in float64, and in fp32 (a power of two times a 5-bit value, no underflow).
    return (block_scales * CODE_VALUES[codes]).astype(np.float32)


def hash32(x: np.ndarray) -> np.ndarray:
    """lowbias32 of uint32 words (numpy wraps the products to 32 bits)."""
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def noise_of(seed: int, first: int, n: int, half: int) -> np.ndarray:
    """The 16 bits of noise of state elements first .. first + n - 1 (half 0: square_avg's, 1: acc_delta's)."""
    key = hash32(np.array([seed & 0xFFFFFFFF], dtype=np.uint64).astype(np.uint32))[0]
    index = ((np.arange(first, first + n, dtype=np.uint64) + np.uint64(key)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return ((hash32(index) >> np.uint32(16 * half)) & np.uint32(0xFFFF)).astype(np.int64)


def encode_block(w: np.ndarray, noise: np.ndarray, round_up_small: bool = False) -> tuple[np.ndarray, np.float32]:
    """The codes and the scale of one quant block's ``w`` (fp32, 1 to 256 values), each
    value's code chosen by its 16 bits of ``noise``; with ``round_up_small``
    (square_avg's), a value below 2**-14 of the scale by noise 0xFFFF (rounded up)."""
    zeros = np.zeros(w.size, dtype=np.uint8)
    nan = np.array(NAN_SCALE_BITS, dtype=np.uint32).view(np.float32)
    if not np.isfinite(w).all():
        return zeros, nan
    w = np.maximum(w, np.float32(0))
    # The max's exponent field, its fp32 bits rounded up at 5 significant bits.
    bits = int(w.max().view(np.uint32))
    exponent = (bits + 0x7FFFF) >> 23
    if bits < 0x800000:  # a zero or subnormal max, even one that rounds up to 2**-126
        return zeros, np.float32(0)
    if exponent >= 255:
        return zeros, nan
    scale = 2.0 ** (exponent - 127)
    x = w.astype(np.float64) / scale  # exact
    if round_up_small:
        noise = np.where(x < 2.0**-14, 0xFFFF, noise)
    # The two values around x; up when noise + the distance above the lower in 2**-16ths
    # of the gap (truncated) reaches 2**16.
    assert (x <= CODE_VALUES[255]).all(), "the scale puts every value at or below the last code"
    below = np.searchsorted(CODE_VALUES, x, side="right") - 1
    above = np.minimum(below + 1, 255)
    gap = CODE_VALUES[above] - CODE_VALUES[below]
    fraction = np.where(gap > 0, (x - CODE_VALUES[below]) / np.where(gap > 0, gap, 1), 0.0)
    codes = np.where(noise + np.floor(fraction * 2**16) >= 2**16, above, below)
    return codes.astype(np.uint8), np.float32(scale)


def encode_pieces_(values: np.ndarray, codes: np.ndarray, scales: np.ndarray, pieces: list[tuple[int, int]],
                   seed: int, half: int) -> None:  # fmt: skip
    """Encode each piece's (state offset, numel) quant blocks of fp32 ``values`` into
    ``codes`` and ``scales``, in place, with the noise of ``seed``'s ``half``; the
    padding after a piece stays as it is."""
    for start, numel in pieces:
        assert start % QUANT_BLOCK == 0
        for first in range(start, start + numel, QUANT_BLOCK):
            last = min(first + QUANT_BLOCK, start + numel)
            noise = noise_of(seed, first, last - first, half)
            codes[first:last], scales[first // QUANT_BLOCK] = encode_block(values[first:last], noise, half == 0)


# -------------------------------------------------------------------------- helpers


def pieces_of(table: SegmentTable) -> list[tuple[int, int]]:
    """(state offset, numel) of each non-empty piece of ``table``."""
    rows = table.pieces[[STATE_ROW, NUMEL_ROW]].tolist()
    return [(start, numel) for start, numel in zip(*rows) if numel > 0]


def aligned_table(params: list[torch.Tensor], grads: list[torch.Tensor], **options) -> tuple[SegmentTable, int]:
    """A table whose pieces start on quant blocks, and its state's size (whole blocks)."""
    table, n_state = table_for_tensors(params, grads, alignment=QUANT_BLOCK, **options)
    return table, -(-n_state // QUANT_BLOCK) * QUANT_BLOCK


def random_state(n_state: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes, and scales 2**-40 .. 2**10 with a few zero blocks."""
    codes = torch.randint(0, 256, (n_state,), generator=generator, dtype=torch.uint8)
    exponents = torch.randint(-40, 11, (n_state // QUANT_BLOCK,), generator=generator)
    scales = torch.pow(2.0, exponents.float())
    scales[torch.rand(scales.shape, generator=generator) < 0.1] = 0.0
    return codes, scales


def random_tensors(
    sizes: list[int], dtype: torch.dtype, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Params and grads of ``sizes``, the grads spanning many magnitudes."""
    params, grads = [], []
    for size in sizes:
        magnitude = torch.exp(torch.randn(size, generator=generator, dtype=torch.float64) * 4)
        params.append(torch.randn(size, generator=generator).to(dtype))
        grads.append((torch.randn(size, generator=generator, dtype=torch.float64) * magnitude).to(dtype))
    return params, grads


def eight_groups() -> torch.Tensor:
    """One group per combination of maximize, weight decay and a tensor lr."""
    groups = tuple(
        (None if flags & 4 else 0.7, 0.9, 1e-6, 0.01 if flags & 2 else 0.0, bool(flags & 1)) for flags in range(8)
    )
    hparams = hparams_table(groups, torch.float32, torch.device("cpu"))
    hparams[:, LR] = 0.7  # the tensor lr's value, as the optimizer copies it in
    return hparams


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, for exact comparison (NaNs included)."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def assert_same_bits(results: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> None:
    """Equal bits, naming the first elements that differ."""
    for result, wanted, name in zip(results, expected, names):
        different = (bits(result) != bits(wanted)).nonzero().flatten()
        assert different.numel() == 0, (
            f"{name}: {different.numel()} elements differ, first at {different[:5].tolist()}: "
            f"{result[different[:5]].tolist()} instead of {wanted[different[:5]].tolist()}"
        )


@pytest.fixture
def native(monkeypatch):
    """The C loop, with the correctly rounded sqrt (its default)."""
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1")
    monkeypatch.delenv("TRITON_ADADELTA_CPU_SQRT", raising=False)
    library = cpu.native_library()
    if library is None:
        pytest.skip("no C compiler here")
    return library


@pytest.fixture(params=["as built", "8 lanes", "16 lanes, packs"])
def u8_step(request, native) -> Callable[..., None]:
    """The uint8-state step under test, with adadelta_step_cpu_'s arguments: the CPU
    path as built here (the C loop's 16 lanes where the CPU has AVX-512), the C loop
    built for 8 lanes (library_8_lanes), or its 16 lanes without the byte permute
    (library_16_lanes_packs)."""
    if request.param == "as built":
        # (The 16-lane loop runs only without flush-to-zero: make sure it is the one tested.)
        lanes = ctypes.c_int.in_dll(native, "adadelta_u8_lanes").value
        assert native.adadelta_u8_lanes_now() == lanes
        return cpu.adadelta_step_cpu_
    library = request.getfixturevalue("library_8_lanes" if request.param == "8 lanes" else "library_16_lanes_packs")

    def step(table: SegmentTable, square_avg: torch.Tensor, acc_delta: torch.Tensor, *, hparams: torch.Tensor,
             grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None, **options) -> None:  # fmt: skip
        cpu._native_step_(library, table, square_avg, acc_delta, hparams, grad_scale, found_inf,
                          use_torch_sqrt=False, **options)  # fmt: skip

    return step


# A step's results: params, codes and scales (square_avg's, acc_delta's), master.
Result = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], "torch.Tensor | None"]


class Run:
    """One step's inputs, copied for each implementation that steps them."""

    def __init__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        codes: tuple[torch.Tensor, torch.Tensor],
        scales: tuple[torch.Tensor, torch.Tensor],
        hparams: torch.Tensor,
        *,
        master: bool = False,
        offsets: list[int] | None = None,
        groups: list[int] | None = None,
    ) -> None:
        self.params, self.grads, self.hparams = params, grads, hparams
        self.codes, self.scales = codes, scales  # (square_avg's, acc_delta's)
        self.options = {"offsets": offsets, "groups": groups}
        self.master = None
        if master:
            generator = torch.Generator().manual_seed(5)
            self.master = torch.randn(codes[0].numel(), generator=generator)

    def copies(
        self,
    ) -> tuple[list[torch.Tensor], SegmentTable, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Fresh copies of the params and the state, and a table over the params' copies."""
        params = [param.clone() for param in self.params]
        table, n_state = aligned_table(params, self.grads, **self.options)
        assert n_state <= self.codes[0].numel()
        master = None if self.master is None else self.master.clone()
        return params, table, [c.clone() for c in self.codes], [s.clone() for s in self.scales], master

    def step_u8(self, step: Callable[..., None] = cpu.adadelta_step_cpu_, **options) -> Result:
        """The uint8-state step of ``step``: params, codes, scales and master after it."""
        params, table, codes, scales, master = self.copies()
        step(table, *codes, hparams=self.hparams, master=master, square_avg_scale=scales[0],
             acc_delta_scale=scales[1], **options)  # fmt: skip
        return params, codes, scales, master

    def reference(
        self, library, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None, **options
    ) -> Result:
        """Decode, the fp32-state C loop, encode (the reference's decode and encode)."""
        params, table, codes, scales, master = self.copies()
        values = [torch.from_numpy(decode(c.numpy(), s.numpy())) for c, s in zip(codes, scales)]
        cpu._native_step_(library, table, *values, self.hparams, grad_scale, found_inf, use_torch_sqrt=False,
                          master=master, **options)  # fmt: skip
        if found_inf is None or found_inf.item() == 0:
            for half, (value, code, scale) in enumerate(zip(values, codes, scales)):
                encode_pieces_(value.numpy(), code.numpy(), scale.numpy(), pieces_of(table), options.get("seed", 0), half)
        return params, codes, scales, master


class WholePiecesRun(Run):
    """A Run whose tables have each param in one piece: its bulk takes its tail."""

    def copies(
        self,
    ) -> tuple[list[torch.Tensor], SegmentTable, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        params, table, codes, scales, master = super().copies()
        pieces = table.pieces.clone()
        pieces[NUMEL_ROW, 0::2] += pieces[NUMEL_ROW, 1::2]
        pieces[NUMEL_ROW, 1::2] = 0  # (the tails, left empty)
        table = dataclasses.replace(table, pieces=pieces, numels=pieces[NUMEL_ROW].clone())
        return params, table, codes, scales, master


def native_step(
    library, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, *, use_torch_sqrt: bool
) -> Callable[..., None]:
    """The C loop's step with adadelta_step_cpu_'s arguments (choosing its sqrt)."""

    def step(table: SegmentTable, square_avg: torch.Tensor, acc_delta: torch.Tensor, *, hparams: torch.Tensor,
             **options) -> None:  # fmt: skip
        cpu._native_step_(library, table, square_avg, acc_delta, hparams, grad_scale, found_inf,
                          use_torch_sqrt=use_torch_sqrt, **options)  # fmt: skip

    return step


def compare(result: Result, expected: Result) -> None:
    """Bit equality of two steps' results."""
    params, codes, scales, master = result
    wanted_params, wanted_codes, wanted_scales, wanted_master = expected
    names = [f"param {i}" for i in range(len(params))] + ["square_avg codes", "acc_delta codes"]
    names += ["square_avg scales", "acc_delta scales"] + ([] if master is None else ["master"])
    assert_same_bits(
        [*params, *codes, *scales, *([] if master is None else [master])],
        [*wanted_params, *wanted_codes, *wanted_scales, *([] if master is None else [wanted_master])],
        names,
    )


# ----------------------------------------------------------------------------- tests


def test_the_reference_follows_the_format():
    # The definition's landmarks, and the reference's encode of exact code values.
    assert CODE_VALUES[0] == 0 and CODE_VALUES[16] == 2.0**-14 and CODE_VALUES[240] == 1.0
    assert CODE_VALUES[255] == 1.9375 and CODE_VALUES[15] == 15 * 2.0**-18
    assert (np.diff(CODE_VALUES) > 0).all()
    codes = np.arange(256, dtype=np.uint8)
    values = decode(codes, np.array([2.0**-3], dtype=np.float32))
    for noise in (0, 0xFFFF):
        encoded, scale = encode_block(values, np.full(256, noise))
        assert scale == np.float32(2.0**-3) and (encoded == codes).all()  # values on the grid keep their codes
    between = np.array([1.0, 1.03125, 1.09375, 2.5 * 2**-18, 3.5 * 2**-18], dtype=np.float32)
    assert encode_block(between, np.zeros(5, dtype=np.int64))[0].tolist() == [240, 240, 241, 2, 3]  # no noise: down
    assert encode_block(between, np.full(5, 0xFFFF))[0].tolist() == [240, 241, 242, 3, 4]  # all noise: up
    assert encode_block(between, np.full(5, 0x8000))[0].tolist() == [240, 241, 242, 3, 4]  # halfway: up


@pytest.mark.parametrize("param_dtype,store", MODES, ids=MODE_IDS)
def test_the_c_loop_gives_the_references_bits(native, u8_step, param_dtype, store):
    # Odd sizes (tails of 1..255, an empty tail, a piece of several blocks) in eight
    # groups (maximize, weight decay, tensor lr), with and without a grad scale.
    if param_dtype == torch.float16 and not cpu._native_f16:
        pytest.skip("the compiler lacks _Float16")
    mode = {"master": store == "master", "stochastic_rounding": store == "stochastic"}
    assert cpu.implementation(torch.device("cpu"), param_dtype, **mode, state_dtype=torch.uint8) == "cpu-native"
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 3, 255, 256, 257, 1031, 3077, 512, 100]
    params, grads = random_tensors(sizes, param_dtype, generator)
    _, n_state = aligned_table(params, grads)
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    run = Run(params, grads, codes, scales, eight_groups(), master=store == "master",
              groups=[i % 8 for i in range(len(sizes))])  # fmt: skip
    options = {"stochastic_rounding": store == "stochastic", "seed": 1234}
    for grad_scale in (None, torch.tensor([3.0])):
        compare(run.step_u8(u8_step, grad_scale=grad_scale, **options),
                run.reference(native, grad_scale=grad_scale, **options))


@pytest.mark.parametrize("param_dtype,store", [mode for mode in MODES if mode[0] != torch.float16],
                         ids=[i for i, mode in zip(MODE_IDS, MODES) if mode[0] != torch.float16])  # fmt: skip
def test_a_piece_of_whole_blocks_and_a_shorter_one(native, u8_step, param_dtype, store):
    # The table splits each param into a bulk of whole quant blocks and a tail, but the
    # C loop takes any piece that starts on a block (adadelta_step_u8_state's contract):
    # here pieces of 288, 608 and 1000 elements, whose last blocks are shorter.
    generator = torch.Generator().manual_seed(6)
    sizes = [288, 608, 1000]
    params, grads = random_tensors(sizes, param_dtype, generator)
    _, n_state = aligned_table(params, grads)
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    run = WholePiecesRun(params, grads, codes, scales, eight_groups(), master=store == "master", groups=[0, 2, 5])
    assert [numel for _, numel in pieces_of(run.copies()[1])] == sizes
    options = {"stochastic_rounding": store == "stochastic", "seed": 77}
    compare(run.step_u8(u8_step, **options), run.reference(native, **options))


def test_edge_cases_of_the_encoding(native, u8_step):
    # One fp32 param, a block per case (rho = 0.5: v = v / 2 + g * g / 2, exact here).
    hparams = hparams_table(((1e-3, 0.5, 1e-6, 0.0, False),), torch.float32, torch.device("cpu"))
    n = 8 * QUANT_BLOCK + 100  # eight blocks and a 100-element tail
    n_state = 9 * QUANT_BLOCK
    grad = torch.zeros(n)
    v_codes = torch.zeros(n_state, dtype=torch.uint8)
    v_scales = torch.zeros(n_state // QUANT_BLOCK)
    block = [slice(b * QUANT_BLOCK, (b + 1) * QUANT_BLOCK) for b in range(9)]
    # 0: halfway values, at normal codes and subnormal ones: (1 + 1.0625) / 2 = 1.03125,
    # between codes 240 and 241; (1.1875 + 1) / 2 between 241 and 242; 2.5 and 3.5 * 2**-18.
    v_scales[0] = 1.0
    v_codes[:5] = torch.tensor([240, 241, 243, 4, 6], dtype=torch.uint8)
    grad[:5] = torch.tensor([1.0, 1.0, 1.0, 2**-9, 2**-9])
    # 1: all zero. 2: a NaN grad among ordinary ones, with its sign bit set (as x86
    # makes NaNs), so that its bits are not the largest. 3: a max of 1.98 * 2**-3, whose
    # 5 significant bits round up to 2**-2 (the scale), from 1.9375 * 2**-3 and
    # g * g / 2 = 0.0425 * 2**-3.
    grad[block[2]][:7] = 1.0
    grad[block[2]][7] = torch.tensor([0xFFC00000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    v_scales[3], v_codes[block[3]][0] = 2.0**-2, 255
    grad[block[3]][0] = (0.0425 * 2**-3 * 2) ** 0.5
    # 4: below fp32's smallest normal (scale 0), a max just below it included, whose 5
    # significant bits round up to 2**-126. 5: a max of 2**127 (scale 2**127, whose
    # inverse is subnormal). 6: a max beyond 1.96875 * 2**127 (scale NaN).
    grad[block[4]][:3] = 1e-20
    grad[block[4]][3] = (2.0**-125 * (1 - 2**-14)) ** 0.5
    grad[block[5]][:2] = torch.tensor([2.0**64, 1.0])
    grad[block[6]][0] = 2.6e19
    # 7: tiny beside big: subnormal codes (2**-16 and 9 * 2**-18 of the scale). 8 (the
    # tail): padding codes that must be neither read into the max nor written.
    grad[block[7]][:3] = torch.tensor([1.0, 2**-8, 3 * 2**-9])
    grad[8 * QUANT_BLOCK :] = 0.5
    v_scales[8] = 1.0
    v_codes[8 * QUANT_BLOCK + 100 :] = 255
    u_codes, u_scales = torch.zeros_like(v_codes), torch.zeros_like(v_scales)
    run = Run([torch.ones(n)], [grad], (v_codes, u_codes), (v_scales, u_scales), hparams)
    result = run.step_u8(u8_step)
    compare(result, run.reference(native))
    compare(result, run.step_u8(adadelta_step_))  # the kernel, under Triton's interpreter
    _, (codes, _), (scales, u_scales_after), _ = result
    # (Halfway values round to either neighbour, by their noise.)
    assert scales[0] == 1.0 and all(c in pair for c, pair in zip(codes[:5].tolist(), [(240,), (240, 241), (241, 242), (2, 3), (3, 4)]))
    assert scales[1] == 0 and codes[block[1]].eq(0).all() and u_scales_after[1] == 0
    assert scales[2].isnan() and bits(scales[2]).item() == NAN_SCALE_BITS and codes[block[2]].eq(0).all()
    assert scales[3] == 2.0**-2 and codes[block[3]][0] in (239, 240)  # 0.99 of the scale
    assert scales[4] == 0 and codes[block[4]].eq(0).all()
    square = torch.tensor(0.5 * float(grad[block[4]][3]) ** 2, dtype=torch.float32)
    assert 0x7C0000 <= bits(square).item() < 0x800000, "a subnormal max that rounds up to 2**-126"
    assert scales[5] == 2.0**127 and codes[block[5]][0] == 240
    assert scales[6].isnan() and codes[block[6]].eq(0).all()
    assert scales[7] == 0.5 and codes[block[7]][:3].tolist() == [240, 4, 9]
    assert scales[8] == 2.0**-3 and codes[8 * QUANT_BLOCK : 8 * QUANT_BLOCK + 100].eq(240).all()
    assert codes[8 * QUANT_BLOCK + 100 :].eq(255).all()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("same_order", [True, False], ids=["same", "reversed"])
@pytest.mark.parametrize("flush", [False, True], ids=["", "flush-to-zero"])
def test_scales_at_the_fast_ways_bounds(native, u8_step, param_dtype, same_order, flush):
    # The C loop encodes a block the fast way where both states' new scales are
    # 2**(E - 127) with E in [37, 254] (8 lanes) or [1, 141] (16 lanes, without
    # flush-to-zero): a block per E about those bounds, about fp32's smallest normal
    # scales and at the largest, acc_delta's scales in the same order (each bound met
    # at both) or reversed (met beside the other's far side), random codes, zero grads
    # and rho = 0.5, so that both states halve and the new scale is 2**(E - 128) (eps:
    # with a zero grad, only d = 0 * sqrt(u + eps) / sqrt(v + eps) sees it, which must
    # not be 0 / 0 where v and u are 0). With flush-to-zero and denormals-are-zero
    # (torch.set_flush_denormal), the 16-lane build runs its 8-lane loop: the bits are
    # the reference's under the same flags.
    hparams = hparams_table(((1e-3, 0.5, 1e-30, 0.0, False),), torch.float32, torch.device("cpu"))
    exponents = [2, 3, 17, 18, 19, 20, 35, 36, 37, 38, 39, 140, 141, 142, 143, 253, 254]
    orders = (exponents, exponents if same_order else exponents[::-1])
    n = (len(exponents) + 1) * QUANT_BLOCK
    generator = torch.Generator().manual_seed(8)
    codes = [torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8) for _ in range(2)]
    # (and a last block of scale 1.5, not a power of two: decoded the exact way)
    scales = [torch.tensor([2.0 ** (e - 127) for e in order] + [1.5]) for order in orders]
    params = [torch.randn(n, generator=generator).to(param_dtype)]
    run = Run(params, [torch.zeros(n, dtype=param_dtype)], tuple(codes), tuple(scales), hparams)
    options = {"stochastic_rounding": param_dtype == torch.bfloat16, "seed": 5}
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero")
    try:
        if flush:
            assert native.adadelta_u8_lanes_now() == min(8, ctypes.c_int.in_dll(native, "adadelta_u8_lanes").value)
        result = run.step_u8(u8_step, **options)
        wanted = run.reference(native, **options)
    finally:
        torch.set_flush_denormal(False)
    compare(result, wanted)
    for new_scales, order in zip(result[2], orders):
        assert (bits(new_scales[:-1]) >> 23).tolist() == [e - 1 for e in order]


@pytest.mark.parametrize("store", ["nearest", "master"])
def test_bf16_params_round_to_nearest_at_the_edges(native, u8_step, store):
    # Zero grads keep each param's value (d = 0), so that the stored bf16 is the
    # param's own bits: subnormals of either sign (which a vcvtneps2bf16 would flush
    # to zero), zeros, infinities, a NaN, and the smallest normals, among ordinary
    # values; and random bits beside them.
    special = [0x0001, 0x8001, 0x007F, 0x807F, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0080, 0x8080, 0x3F80]
    generator = torch.Generator().manual_seed(12)
    n = 4 * QUANT_BLOCK
    words = torch.randint(0, 1 << 16, (n,), generator=generator, dtype=torch.int32)
    words[:: QUANT_BLOCK // 8] = torch.tensor(special * 3)[: n // (QUANT_BLOCK // 8)]
    words[QUANT_BLOCK : 2 * QUANT_BLOCK] = torch.tensor(special * 22)[:QUANT_BLOCK]  # a block of edges alone
    param = words.to(torch.int16).view(torch.bfloat16)
    hparams = hparams_table(((1.0, 0.9, 1e-6, 0.0, False),), torch.float32, torch.device("cpu"))
    codes, scales = zip(*(random_state(n, generator) for _ in range(2)))
    run = Run([param], [torch.zeros(n, dtype=torch.bfloat16)], codes, scales, hparams, master=store == "master")
    if run.master is not None:
        run.master = param.float()
    result = run.step_u8(u8_step)
    compare(result, run.reference(native))
    # d = 0: each param as it was (a signaling NaN quieted)
    words = bits(param).to(torch.int32) & 0xFFFF
    nan = (words & 0x7F80 == 0x7F80) & (words & 0x7F != 0)
    assert torch.equal(bits(result[0][0]).to(torch.int32) & 0xFFFF, torch.where(nan, words | 0x40, words))


def test_found_inf_writes_nothing(native):
    generator = torch.Generator().manual_seed(3)
    params, grads = random_tensors([700, 33], torch.bfloat16, generator)
    _, n_state = aligned_table(params, grads)
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    run = Run(params, grads, codes, scales, eight_groups(), master=True)
    for found_inf, changed in ((torch.tensor([1.0]), False), (torch.tensor([0.0]), True)):
        result = run.step_u8(found_inf=found_inf)
        compare(result, run.reference(native, found_inf=found_inf))
        params_after, codes_after, scales_after, _ = result
        unchanged = all(torch.equal(bits(a), bits(b)) for a, b in zip(codes_after + scales_after, codes + scales))
        assert unchanged != changed and all(torch.equal(a, b) for a, b in zip(params_after, params)) != changed


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threads_never_split_a_quant_block(native, threads):
    # Many odd sizes, beyond NATIVE_PARALLEL_MIN_ELEMENTS: the shares' ends fall in
    # the middle of pieces, after tails that shift the concatenation off the blocks.
    generator = torch.Generator().manual_seed(threads)
    sizes = torch.randint(1, 4000, (400,), generator=generator).tolist()
    assert sum(sizes) > cpu.NATIVE_PARALLEL_MIN_ELEMENTS
    params, grads = random_tensors(sizes, torch.bfloat16, generator)
    _, n_state = aligned_table(params, grads)
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    run = Run(params, grads, codes, scales, eight_groups(), groups=[i % 8 for i in range(len(sizes))])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run.step_u8(stochastic_rounding=True, seed=9)
        torch.set_num_threads(threads)
        compare(run.step_u8(stochastic_rounding=True, seed=9), alone)
    finally:
        torch.set_num_threads(before)
    compare(alone, run.reference(native, stochastic_rounding=True, seed=9))


@pytest.mark.parametrize("param_dtype,store", [mode for mode in MODES if mode[1] != "stochastic"],
                         ids=[i for i, mode in zip(MODE_IDS, MODES) if mode[1] != "stochastic"])  # fmt: skip
def test_the_chunked_ops_give_the_c_loops_bits(native, monkeypatch, param_dtype, store):
    # With torch's sqrt in both. Small params gathered into one chunk with the padding
    # between them and a hole of two whole blocks (another param's state, outside the
    # table) whose codes and scales stay as they are, and a param of three chunks.
    if param_dtype == torch.float16 and not cpu._native_f16:
        pytest.skip("the compiler lacks _Float16")
    generator = torch.Generator().manual_seed(1)
    sizes = [5, 300, 256, 1, 2 * cpu.CHUNK_ELEMENTS + 1000, 77]
    params, grads = random_tensors(sizes, param_dtype, generator)
    offsets, end = [], 0
    for k, size in enumerate(sizes):
        end += 2 * QUANT_BLOCK if k == 2 else 0  # the hole
        offsets.append(end)
        end += -(-size // QUANT_BLOCK) * QUANT_BLOCK
    codes, scales = zip(*(random_state(end, generator) for _ in range(2)))
    # (A chunk gathers params of one group only.)
    run = Run(params, grads, codes, scales, eight_groups(), master=store == "master", offsets=offsets,
              groups=[7, 7, 7, 7, 2, 5])  # fmt: skip
    steps = ((None, None), (torch.tensor([3.0]), torch.tensor([0.0])), (None, torch.tensor([1.0])))
    for grad_scale, found_inf in steps:
        native_result = run.step_u8(native_step(native, grad_scale, found_inf, use_torch_sqrt=True))
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "0")
        assert cpu.implementation(torch.device("cpu"), param_dtype, master=store == "master",
                                  stochastic_rounding=False, state_dtype=torch.uint8) == "cpu-chunked"  # fmt: skip
        chunked_result = run.step_u8(grad_scale=grad_scale, found_inf=found_inf)
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1")
        compare(chunked_result, native_result)
        hole = slice(offsets[2] - 2 * QUANT_BLOCK, offsets[2])
        for after, before in zip(chunked_result[1], codes):
            assert torch.equal(after[hole], before[hole])
        hole_blocks = slice(hole.start // QUANT_BLOCK, hole.stop // QUANT_BLOCK)
        for after, before in zip(chunked_result[2], scales):
            assert torch.equal(bits(after[hole_blocks]), bits(before[hole_blocks]))


def test_a_table_off_the_quant_blocks_is_refused(native):
    # Pieces split at 8 elements: a tail starts inside a quant block. The C loop
    # refuses it before writing anything, as does the public entry.
    generator = torch.Generator().manual_seed(2)
    params, grads = random_tensors([300, 40], torch.float32, generator)
    table, n_state = table_for_tensors(params, grads)
    n_state = -(-n_state // QUANT_BLOCK) * QUANT_BLOCK
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    state = [c.clone() for c in codes] + [s.clone() for s in scales]
    hparams = eight_groups()[:1]
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="multiple of 256"):
        cpu._native_step_(native, table, *state[:2], hparams, None, None, use_torch_sqrt=False,
                          square_avg_scale=state[2], acc_delta_scale=state[3])  # fmt: skip
    with pytest.raises(ValueError):
        cpu.adadelta_step_cpu_(table, *state[:2], hparams=hparams, square_avg_scale=state[2], acc_delta_scale=state[3])
    assert all(torch.equal(a, b) for a, b in zip(state, codes + scales))
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_uint8_state_needs_both_scales(native):
    params, grads = [torch.ones(300)], [torch.ones(300)]
    table, n_state = aligned_table(params, grads)
    codes = torch.zeros(n_state, dtype=torch.uint8)
    hparams = eight_groups()[:1]
    scale = torch.zeros(n_state // QUANT_BLOCK)
    for square_avg_scale, acc_delta_scale in ((None, None), (scale, None), (scale, scale[:1]), (scale, scale.double())):
        with pytest.raises(ValueError, match="scale"):
            cpu._native_step_(native, table, codes, codes.clone(), hparams, None, None, use_torch_sqrt=False,
                              square_avg_scale=square_avg_scale, acc_delta_scale=acc_delta_scale)  # fmt: skip


@pytest.mark.parametrize("param_dtype,store", MODES, ids=MODE_IDS)
def test_the_c_loop_gives_the_kernels_bits(native, param_dtype, store):
    # The kernel under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) and
    # the C loop: the same codes, scales and params, with weight decay (the C loop's
    # any-flags branch) and without, on tails shorter than a quant block.
    if param_dtype == torch.float16 and not cpu._native_f16:
        pytest.skip("the compiler lacks _Float16")
    generator = torch.Generator().manual_seed(0)
    params, grads = random_tensors([1100, 37, 256], param_dtype, generator)
    _, n_state = aligned_table(params, grads)
    codes, scales = zip(*(random_state(n_state, generator) for _ in range(2)))
    for weight_decay in (0.0, 0.01):
        hparams = hparams_table(((1.0, 0.9, 1e-6, weight_decay, False),), torch.float32, torch.device("cpu"))
        run = Run(params, grads, codes, scales, hparams, master=store == "master")
        options = {"stochastic_rounding": store == "stochastic", "seed": 77}
        compare(run.step_u8(**options), run.step_u8(adadelta_step_, **options))
