"""8-bit optimizer state (``state_dtype=torch.uint8``, issue 15).

``square_avg`` and ``acc_delta`` are stored as uint8 codes with one fp32 scale per
block of 256 (:mod:`triton_adadelta.quant`); the oracle properties
(``tests/test_oracle_properties.py``, the ``*_u8_state`` modes) check every stored code
and scale against the fp64 oracle and its exact quantizer. Here: the kernel's codes
are the package's torch quantizer's on awkward blocks, a step's param is the
fp32-state step's, state_dict is torch's fp32 format and round-trips bit for bit (so
does the compact form), the layout starts every piece on a quant block, the options
are checked, and a training run stays close to fp32 state.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from triton_adadelta import Adadelta
from triton_adadelta.flat import table_for_tensors
from triton_adadelta.kernels.adadelta import QUANT_BLOCK
from triton_adadelta.puzzlelib import AdaDelta
from triton_adadelta import quant
from triton_adadelta.quant import dequantize, quantize_, state_noise
from triton_adadelta.update import step_flat_

STATE_KEYS = ("square_avg", "acc_delta", "square_avg_scale", "acc_delta_scale")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 300 x 20 + 300 + 3 x 300 + 3: bulks of whole quant blocks and short tails.
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))


def _train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int = 1) -> float:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 20, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    x = x.to(next(model.parameters()).dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
    return torch.nn.functional.cross_entropy(model(x).float(), y).item()


def _quantized(
    values: torch.Tensor, noise: torch.Tensor | None = None, round_up_small: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's torch quantizer: to nearest, or stochastically by ``noise``
    (``round_up_small``: square_avg's way, its subnormal codes rounded up)."""
    codes = torch.empty(values.numel(), dtype=torch.uint8)
    scales = torch.empty(-(-values.numel() // QUANT_BLOCK))
    quantize_(values.reshape(-1).float(), codes, scales, noise, round_up_small)
    return codes, scales


def _blocks_of(values: list[float]) -> torch.Tensor:
    """A 256-element block around the given values (the rest small and positive)."""
    block = torch.linspace(1e-3, 2e-3, QUANT_BLOCK)
    block[: len(values)] = torch.tensor(values)
    return block


# Blocks whose quantization has a case of its own.
AWKWARD_BLOCKS = {
    "zeros": torch.zeros(QUANT_BLOCK),
    "max rounds up to the next power of two": _blocks_of([1.97 * 2.0**-3]),
    "max just below the carry": _blocks_of([1.96 * 2.0**-3]),
    "tiny beside large (subnormal codes)": _blocks_of([1.0, 2.0**-16, 3 * 2.0**-19, 2.0**-19, 2.0**-20]),
    "ties to even": _blocks_of([1.0, 1.03125, 1.09375, 0.515625]),
    "a NaN": _blocks_of([float("nan")]),
    "an inf": _blocks_of([float("inf")]),
    "largest value subnormal": torch.full((QUANT_BLOCK,), 2.0**-127),
    "largest value near fp32's max": _blocks_of([3e38]),
}


SEED = 1234


def _step(param, grad, state: dict[str, torch.Tensor], backend: str, **hyper) -> None:
    hyper = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, **hyper}
    step_flat_(param, grad, state["square_avg"], state["acc_delta"], **hyper, square_avg_scale=state["square_avg_scale"],
               acc_delta_scale=state["acc_delta_scale"], seed=SEED, backend=backend)  # fmt: skip


def _state_of(values: torch.Tensor) -> dict[str, torch.Tensor]:
    codes, scales = _quantized(values)
    return {"square_avg": codes, "acc_delta": codes.clone(), "square_avg_scale": scales, "acc_delta_scale": scales.clone()}


@pytest.mark.parametrize("name", list(AWKWARD_BLOCKS))
def test_a_step_stores_the_quantizers_codes_on_awkward_blocks(backend, name):
    values = AWKWARD_BLOCKS[name]
    n = values.numel()
    # rho = 0: the new square_avg is fp32's g * g, whatever the old one; quantized as
    # the package's torch quantizer (triton_adadelta.quant) quantizes it, with the
    # step's noise (the low halves of state_noise).
    grad = values.sqrt()
    state = _state_of(torch.zeros(n))
    _step(torch.zeros(n), grad, state, backend, rho=0.0)
    codes, scales = _quantized(grad * grad, state_noise(SEED, 0, n) & 0xFFFF, round_up_small=True)
    torch.testing.assert_close(state["square_avg_scale"], scales, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(state["square_avg"], codes)
    # rho = 1 and no grad: both buffers keep their values (a value on the grid rounds
    # to itself, whatever the noise). The codes too, but where the largest value was
    # rounded down under a doubled scale: it is then stored one binade lower.
    state = _state_of(values)
    before = {key: value.clone() for key, value in state.items()}
    _step(torch.zeros(n), torch.zeros(n), state, backend, rho=1.0)
    for buffer in ("square_avg", "acc_delta"):
        torch.testing.assert_close(
            dequantize(state[buffer], state[f"{buffer}_scale"]), dequantize(before[buffer], before[f"{buffer}_scale"]),
            rtol=0, atol=0, equal_nan=True, msg=buffer,
        )  # fmt: skip
    if name != "max just below the carry":
        for key in STATE_KEYS:
            torch.testing.assert_close(state[key], before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_constant_grads_leave_acc_delta_near_fp32_states(backend):
    # The same grads every step, as perf/bench_step.py steps. In each block one grad is
    # 8 (its square_avg's scale: 64) and the rest 3e-3, so their square_avg, 9e-6, lies below
    # the block's first code above 0 (64 * 2**-22, 1.5e-5). Rounded stochastically
    # there, it read back as 0 two times in five, and each such step multiplied
    # acc_delta by 0.9 + 0.1 * g**2 / eps = 1.8: it reached 352 in 60 steps (fp32
    # state's: 1.7e-5).
    # square_avg's subnormal codes round up, so it reads back at or above its value.
    n, steps, rho, eps = 4 * QUANT_BLOCK, 60, 0.9, 1e-6
    grad = torch.full((n,), 3e-3)
    grad[::QUANT_BLOCK] = 8.0
    state = _state_of(torch.zeros(n))
    square_avg, acc_delta = torch.zeros(n), torch.zeros(n)  # fp32 state's, in torch ops
    for step in range(steps):  # (each step its own seed, as the optimizer's)
        step_flat_(torch.zeros(n), grad, state["square_avg"], state["acc_delta"], lr=1.0, rho=rho, eps=eps,
                   weight_decay=0.0, square_avg_scale=state["square_avg_scale"],
                   acc_delta_scale=state["acc_delta_scale"], seed=SEED + step, backend=backend)  # fmt: skip
        square_avg = square_avg * rho + grad * grad * (1 - rho)
        delta = (acc_delta + eps).sqrt() / (square_avg + eps).sqrt() * grad
        acc_delta = acc_delta * rho + delta * delta * (1 - rho)
    ours = dequantize(state["acc_delta"], state["acc_delta_scale"])
    assert ours.max() <= 2 * acc_delta.max(), (ours.max(), acc_delta.max())


def test_the_quantizer_rounds_on_a_power_of_two_grid():
    block = _blocks_of([1.5, 1.0, 0.75, 1.03125, 1.09375, 2.0**-14, 3 * 2.0**-19, 2.0**-20])
    codes, scales = _quantized(block)
    assert scales.item() == 1.0  # the largest value, 1.5, is in [1, 2)
    # To nearest (as a state_dict loads): 1.03125 ties to 1, 1.09375 to 1.125.
    assert codes[:8].tolist() == [0xF8, 0xF0, 0xE8, 0xF0, 0xF2, 0x10, 2, 0]
    assert dequantize(codes, scales)[:8].tolist() == [1.5, 1.0, 0.75, 1.0, 1.125, 2.0**-14, 2 * 2.0**-18, 0.0]
    # Stochastically (as a step stores): the noise's top bits against the dropped bits.
    for noise, expected in ((0, [0xF8, 0xF0, 0xE8, 0xF0, 0xF1, 0x10, 1, 0]), (0xFFFF, [0xF8, 0xF0, 0xE8, 0xF1, 0xF2, 0x10, 2, 1])):
        codes, _ = _quantized(block, torch.full((QUANT_BLOCK,), noise, dtype=torch.int64))
        assert codes[:8].tolist() == expected, noise
    # The scale: the power of two at or below the largest value rounded up to 5
    # significant bits, so no value rounds up past code 255.
    for largest, scale in ((1.9375, 1.0), (1.94, 2.0), (1.97, 2.0)):
        codes, scales = _quantized(_blocks_of([largest]))
        assert scales.item() == scale, largest


def test_stochastic_rounding_of_the_codes_is_unbiased(backend):
    # Every element gets the same inputs: each stored code is an independent rounding
    # of the same fp32 value, so their mean is that value (to 2**-16 of a gap).
    n = 1 << 16
    value = 0.3  # on no grid point: between codes 0xE3 (0.296875) and 0xE4 (0.3125) at scale 1
    grad = torch.full((n,), value**0.5)
    state = _state_of(torch.zeros(n))
    _step(torch.zeros(n), grad, state, backend, rho=0.0)
    stored = dequantize(state["square_avg"], state["square_avg_scale"]).double()
    exact = float(torch.tensor(value**0.5) * torch.tensor(value**0.5))
    low, high = 0.296875, 0.3125
    assert set(stored.unique().tolist()) == {low, high}
    fraction = (exact - low) / (high - low)
    standard_error = (high - low) * (fraction * (1 - fraction) / n) ** 0.5
    assert abs(stored.mean().item() - exact) < 6 * standard_error, "biased"


@pytest.mark.parametrize(
    "param_dtype,options",
    [
        (torch.float32, {}),
        (torch.bfloat16, {}),
        (torch.bfloat16, {"master_weights": True}),
        (torch.float16, {}),
    ],
)
def test_the_first_step_gives_the_fp32_state_steps_params(backend, param_dtype, options):
    # (Not with stochastic rounding: its noise is drawn at the element's index in the
    # flat state, and 8-bit state lays the segments out on quant blocks.)
    # From zero state, the param update uses the new fp32 values before they are
    # quantized: the first step's params are the fp32-state step's, bit for bit.
    model, reference = _model().to(param_dtype), _model().to(param_dtype)
    ours = Adadelta(model.parameters(), state_dtype=torch.uint8, **options)
    theirs = Adadelta(reference.parameters(), **options)
    torch.manual_seed(5)
    _train(ours, model, 1)
    torch.manual_seed(5)
    _train(theirs, reference, 1)
    for mine, expected in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, expected)
    # The state: the fp32 state quantized with the step's noise, at each param's offset
    # (the step's seed is torch's first draw after the manual seed).
    torch.manual_seed(5)
    seed = int(torch.randint(1, 2**31 - 1, (1,)).item())
    (flat,) = ours.flat_states()
    for i, (mine, expected) in enumerate(zip(model.parameters(), reference.parameters())):
        state = ours.state[mine]
        noise = state_noise(seed, flat.offsets[i], mine.numel())
        for name, half in (("square_avg", noise & 0xFFFF), ("acc_delta", noise >> 16)):
            want_codes, want_scales = _quantized(theirs.state[expected][name], half, name == "square_avg")
            assert torch.equal(state[name].reshape(-1), want_codes), name
            torch.testing.assert_close(state[f"{name}_scale"], want_scales, rtol=0, atol=0, equal_nan=True)


def test_pieces_start_on_quant_blocks_and_the_state_is_about_2_bytes_per_param():
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    (flat,) = optimizer.flat_states()
    assert all(offset % QUANT_BLOCK == 0 for offset in flat.offsets)
    assert flat.square_avg.dtype == torch.uint8 and flat.square_avg_scale.numel() == flat.n_elements // QUANT_BLOCK
    table, n_state = table_for_tensors([p.detach() for p in model.parameters()], [torch.zeros_like(p) for p in model.parameters()], alignment=QUANT_BLOCK)
    assert n_state <= flat.n_elements
    starts = table.pieces[2][table.pieces[3] > 0]
    assert bool((starts % QUANT_BLOCK == 0).all())
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in (flat.square_avg, flat.acc_delta, flat.square_avg_scale, flat.acc_delta_scale))
    # 2 B of codes and 8/256 B of scales per element, plus each param's padding to a block.
    assert state_bytes == flat.n_elements * (2 + 8 / QUANT_BLOCK)
    assert flat.n_elements < n_params + QUANT_BLOCK * len(flat.params)


def test_state_dict_is_torchs_fp32_format_and_round_trips_bit_for_bit(backend):
    model = _model()
    optimizer = Adadelta(model.parameters(), lr=0.5, state_dtype=torch.uint8)
    _train(optimizer, model, 3)
    state_dict = optimizer.state_dict()
    for value in state_dict["state"].values():
        assert set(value) == {"step", "square_avg", "acc_delta"}
        assert value["square_avg"].dtype == torch.float32
    # torch's Adadelta takes it.
    torch.optim.Adadelta(model.parameters()).load_state_dict(state_dict)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = Adadelta(model.parameters(), lr=0.5, state_dtype=torch.uint8)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    compact = Adadelta(model.parameters(), lr=0.5, state_dtype=torch.uint8)
    compact.load_state_dict(copy.deepcopy(optimizer.compact_state_dict()))
    # The compact form gives back the codes; the fp32 form the values (and the codes,
    # but where a block's largest value sits one binade below its scale: see quant).
    for param in model.parameters():
        state = optimizer.state[param]
        for key in STATE_KEYS:
            assert torch.equal(compact.state[param][key], state[key]), key
        for name in ("square_avg", "acc_delta"):
            values = dequantize(state[name].reshape(-1), state[f"{name}_scale"])
            assert torch.equal(dequantize(loaded.state[param][name].reshape(-1), loaded.state[param][f"{name}_scale"]), values)
    # And the runs go on alike (the noise's seeds drawn alike).
    twin_model = copy.deepcopy(model)
    twin = Adadelta(twin_model.parameters(), lr=0.5, state_dtype=torch.uint8)
    twin.load_state_dict(state_dict)
    torch.manual_seed(11)
    _train(optimizer, model, 2, seed=7)
    torch.manual_seed(11)
    _train(twin, twin_model, 2, seed=7)
    for mine, theirs in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(mine, theirs)


def test_the_compact_state_dict_holds_codes_and_scales_and_is_a_quarter_of_the_size():
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 1)
    sizes = []
    for state_dict in (optimizer.state_dict(), optimizer.compact_state_dict()):
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        sizes.append(buffer.tell())
    compact = optimizer.compact_state_dict()["state"][0]
    assert compact["square_avg"].dtype == torch.uint8 and compact["square_avg_scale"].dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    # fp32: 8 B per param; compact: 2 B of codes and a scale per 256 codes (and torch.save's overhead).
    assert sizes[0] > 7.5 * n_params and sizes[1] < 2.5 * n_params + 20_000, sizes


@pytest.mark.parametrize("noise", [False, True])
def test_quantizing_and_decoding_chunk_by_chunk_gives_what_one_pass_gives(monkeypatch, noise):
    n = 5 * QUANT_BLOCK + 77  # chunks of 2 blocks, the last one short
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(n, generator=generator).square() * torch.logspace(-30, 3, n)
    values[QUANT_BLOCK + 5] = float("nan")  # a NaN block between chunks' ordinary ones
    noise_bits = state_noise(5, 0, n) & 0xFFFF if noise else None
    results = []
    for chunk in (1 << 30, 2 * QUANT_BLOCK):
        monkeypatch.setattr(quant, "CHUNK", chunk)
        codes = torch.empty(n, dtype=torch.uint8)
        scales = torch.empty(-(-n // QUANT_BLOCK))
        quantize_(values, codes, scales, noise_bits, round_up_small=noise)
        results.append((codes, scales, dequantize(codes, scales)))
    for whole, chunked in zip(*results):
        bits = (lambda t: t.view(torch.int32)) if whole.is_floating_point() else (lambda t: t)  # noqa: E731 (NaNs too)
        assert torch.equal(bits(whole), bits(chunked))
    assert results[0][1].isnan().sum() == 1 and bool((results[0][0] > 16).any())


def test_a_compact_state_dict_loads_its_own_codes_and_scales():
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 2)
    state_dict = copy.deepcopy(optimizer.compact_state_dict())
    # A block whose largest code sits below 240 (its largest value below its scale, as a
    # stochastic rounding down from just under a power of two leaves it): its values
    # requantized would take half the scale and codes 16 higher.
    codes = state_dict["state"][0]["square_avg"].view(-1)
    codes[:QUANT_BLOCK] = codes[:QUANT_BLOCK].clamp(max=239)
    assert float(state_dict["state"][0]["square_avg_scale"][0]) > 0
    loaded = Adadelta(model.parameters(), state_dtype=torch.uint8)
    loaded.load_state_dict(state_dict)
    again = loaded.compact_state_dict()
    for key, value in state_dict["state"].items():
        for name, tensor in value.items():
            assert torch.equal(again["state"][key][name], tensor), (key, name)


def test_compact_codes_cast_to_another_dtype_are_refused():
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 1)
    before = {key: value.clone() for key, value in optimizer.state[model[0].weight].items()}
    state_dict = copy.deepcopy(optimizer.compact_state_dict())
    # As a tool that upcasts every tensor of a checkpoint would leave it.
    state_dict["state"][0]["square_avg"] = state_dict["state"][0]["square_avg"].float()
    for target in (optimizer, Adadelta(_model().parameters())):
        with pytest.raises(ValueError, match="comes with 'square_avg_scale'.*torch.float32, not torch.uint8"):
            target.load_state_dict(state_dict)
    for key, value in before.items():
        assert torch.equal(optimizer.state[model[0].weight][key], value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_put_in_place_of_codes_is_saved_as_its_values_not_decoded(dtype):
    # Replacing a tensor inside an entry is not followed by the step (README), but the
    # state_dict of it must not take the new tensor for codes (bf16 params with master
    # weights: the other state's codes came out as bf16 values, 249.0 for 0.098, with
    # the scales kept, which ours then refused to load), nor decode it as codes.
    model = _model().to(dtype)
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8, master_weights=dtype == torch.bfloat16)
    _train(optimizer, model, 2)
    weight = model[0].weight
    acc_delta = optimizer.state_dict()["state"][0]["acc_delta"]
    optimizer.state[weight]["square_avg"] = torch.full_like(weight, 0.25)
    state_dict = optimizer.state_dict()
    saved = state_dict["state"][0]
    assert "square_avg_scale" not in saved and "acc_delta_scale" not in saved
    assert torch.equal(saved["square_avg"], torch.full(weight.shape, 0.25)) and torch.equal(saved["acc_delta"], acc_delta)
    loaded = Adadelta(_model().to(dtype).parameters(), state_dtype=torch.uint8, master_weights=dtype == torch.bfloat16)
    loaded.load_state_dict(state_dict)
    assert torch.equal(loaded.state_dict()["state"][0]["square_avg"], saved["square_avg"])


def test_loading_torchs_fp32_state_quantizes_it(backend):
    model = _model()
    reference = torch.optim.Adadelta(model.parameters())
    _train(reference, model, 2)
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    optimizer.load_state_dict(reference.state_dict())
    for param in model.parameters():
        for name in ("square_avg", "acc_delta"):
            codes, scales = _quantized(reference.state[param][name])
            assert torch.equal(optimizer.state[param][name].reshape(-1), codes)
            assert torch.equal(optimizer.state[param][f"{name}_scale"], scales)


def test_a_bad_compact_state_is_refused_and_changes_nothing():
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 1)
    state_dict = optimizer.compact_state_dict()
    before = {key: value.clone() for key, value in optimizer.state[model[0].weight].items()}
    broken = copy.deepcopy(state_dict)
    del broken["state"][0]["square_avg_scale"]
    with pytest.raises(ValueError, match="square_avg_scale"):
        optimizer.load_state_dict(broken)
    broken = copy.deepcopy(state_dict)
    broken["state"][0]["acc_delta_scale"] = broken["state"][0]["acc_delta_scale"][:-1]
    with pytest.raises(ValueError, match=r"acc_delta_scale.*not torch.float32 of \d+ elements"):
        optimizer.load_state_dict(broken)
    # Scales the encoder never writes: a negative one read back as zeros, an inf one
    # made NaN weights after a step, and 3.0 is no power of two.
    for bad in (-1.0, float("inf"), 3.0, 2.0**-130, -0.0):
        broken = copy.deepcopy(state_dict)
        broken["state"][1]["square_avg_scale"][-1] = bad
        with pytest.raises(ValueError, match="square_avg_scale' of param 1 holds 1 scales that no 8-bit state has"):
            optimizer.load_state_dict(broken)
    # Every scale the encoder writes loads: 0, NaN, 2**-126 and 2**127.
    fine = copy.deepcopy(state_dict)
    fine["state"][0]["acc_delta_scale"][:4] = torch.tensor([0.0, float("nan"), 2.0**-126, 2.0**127])[: fine["state"][0]["acc_delta_scale"].numel()]
    Adadelta(_model().parameters(), state_dtype=torch.uint8).load_state_dict(fine)
    for key, value in before.items():
        assert torch.equal(optimizer.state[model[0].weight][key], value)


def test_the_options_are_checked():
    with pytest.raises(ValueError, match="not torch.float64"):
        Adadelta([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], state_dtype=torch.uint8)
    with pytest.raises(ValueError, match="not torch.complex64"):
        Adadelta([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], state_dtype=torch.uint8)
    optimizer = Adadelta(_model().parameters(), state_dtype=torch.uint8)
    with pytest.raises(ValueError, match="not torch.float64"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})


def test_a_group_switched_to_8_bit_state_carries_its_state_over(backend):
    model = _model()
    optimizer = Adadelta(model.parameters())
    _train(optimizer, model, 2)
    fp32_state = {param: optimizer.state[param]["square_avg"].clone() for param in model.parameters()}
    optimizer.param_groups[0]["state_dtype"] = torch.uint8
    optimizer.flat_states()
    for param, values in fp32_state.items():
        codes, scales = _quantized(values)
        assert torch.equal(optimizer.state[param]["square_avg"].reshape(-1), codes)
        assert torch.equal(optimizer.state[param]["square_avg_scale"], scales)
    _train(optimizer, model, 1)
    optimizer.param_groups[0]["state_dtype"] = torch.float32
    optimizer.flat_states()
    for param in model.parameters():
        assert optimizer.state[param]["square_avg"].dtype == torch.float32


def test_copies_and_the_puzzlelib_api(backend):
    torch.manual_seed(0)
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 1)
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        for param, other in zip(optimizer.param_groups[0]["params"], clone.param_groups[0]["params"]):
            for key in STATE_KEYS:
                assert torch.equal(clone.state[other][key], optimizer.state[param][key])
    net = _model()
    seed_api = AdaDelta(state_dtype=torch.uint8)
    seed_api.setupOn(net)
    _train(seed_api.optimizer, net, 1)
    assert seed_api.optimizer.state[net[0].weight]["square_avg"].dtype == torch.uint8


def test_training_with_8_bit_state_follows_fp32_state(backend):
    # A short run: the losses stay within a few percent (perf/numerics.py measures
    # the digits MLP over 30 epochs against the targets).
    losses = []
    for state_dtype in (torch.float32, torch.uint8):
        model = _model()
        losses.append(_train(Adadelta(model.parameters(), state_dtype=state_dtype), model, 30))
    assert abs(losses[1] - losses[0]) <= 0.03 * losses[0], losses



def test_the_rounding_seeds_are_in_the_state_dict_and_a_resume_needs_no_rng_state(backend):
    # Only the first launch that rounds draws from torch's generator; the first param
    # group holds that seed and the launches since, so a run resumed after any draws
    # from the generator (a new process) rounds as the uninterrupted one, bit for bit.
    model, twin_model = _model(), _model()
    twin_model.load_state_dict(model.state_dict())
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    torch.manual_seed(3)
    _train(optimizer, model, 2, seed=1)
    group = optimizer.state_dict()["param_groups"][0]
    assert isinstance(group["rounding_seed"], int) and group["rounding_launches"] == 2
    rng = torch.get_rng_state()
    _train(optimizer, model, 1, seed=2)
    assert torch.equal(torch.get_rng_state(), rng), "a later step drew from torch's generator"

    twin = Adadelta(twin_model.parameters(), state_dtype=torch.uint8)
    torch.manual_seed(3)
    _train(twin, twin_model, 2, seed=1)
    saved = copy.deepcopy(twin.state_dict())
    fresh_model = copy.deepcopy(twin_model)
    resumed = Adadelta(fresh_model.parameters(), state_dtype=torch.uint8)
    resumed.load_state_dict(saved)
    torch.manual_seed(999)  # another process's generator
    _train(resumed, fresh_model, 1, seed=2)
    for mine, theirs in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(mine, theirs)
    # torch's Adadelta loads it (the keys ride along), a copy rounds on as the original,
    # and loading torch's dict (no seed) keeps this optimizer's own.
    torch.optim.Adadelta(copy.deepcopy(model).parameters()).load_state_dict(optimizer.state_dict())
    copied = copy.deepcopy(optimizer)
    assert copied.param_groups[0]["rounding_seed"] == optimizer.param_groups[0]["rounding_seed"]
    assert copied.param_groups[0]["rounding_launches"] == 3
    theirs = torch.optim.Adadelta(copy.deepcopy(model).parameters())
    optimizer.load_state_dict(theirs.state_dict())
    assert (optimizer.param_groups[0]["rounding_seed"], optimizer.param_groups[0]["rounding_launches"]) == (
        copied.param_groups[0]["rounding_seed"], 3)


def test_the_launch_count_of_a_state_dict_or_group_is_never_counted_in_place():
    # ZeroRedundancyOptimizer saves its groups' values as they are and loads a dict's
    # as they are: a count counted in place changed the saved dict under its holder.
    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 2)
    state_dict = optimizer.state_dict()
    state_dict["param_groups"][0]["rounding_launches"] = held = torch.tensor(2)  # (as ZeRO's state_dict holds it)
    optimizer.load_state_dict(state_dict)
    in_group = optimizer.param_groups[0]["rounding_launches"]
    _train(optimizer, model, 3)
    assert int(held) == 2 and int(in_group) == 2
    assert optimizer.state_dict()["param_groups"][0]["rounding_launches"] == 5


def test_a_checkpoint_before_the_first_rounding_launch_holds_the_seed_too():
    # Saved before any step (or while the rounding groups are frozen), then resumed in
    # another process: the seed was drawn when saving, so the runs round alike.
    model, twin_model = _model(), _model()
    twin_model.load_state_dict(model.state_dict())
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["param_groups"][0]["rounding_launches"] == 0
    twin = Adadelta(twin_model.parameters(), state_dtype=torch.uint8)
    twin.load_state_dict(saved)
    torch.manual_seed(1)
    _train(optimizer, model, 2)
    torch.manual_seed(2)
    _train(twin, twin_model, 2)
    for mine, theirs in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(mine, theirs)


def test_a_bad_rounding_entry_is_refused_and_changes_nothing():
    import numpy as np

    model = _model()
    optimizer = Adadelta(model.parameters(), state_dtype=torch.uint8)
    _train(optimizer, model, 1)
    before = {key: optimizer.param_groups[0][key] for key in ("rounding_seed", "rounding_launches")}
    for seed, launches in ((0, 1), (5, -1), (5.0, 1), (2**31 - 1, 0), (True, 1), ("5", 1)):
        state_dict = copy.deepcopy(optimizer.state_dict())
        state_dict["param_groups"][0].update(rounding_seed=seed, rounding_launches=launches)
        with pytest.raises(ValueError, match="rounding_seed"):
            optimizer.load_state_dict(state_dict)
        assert {key: optimizer.param_groups[0][key] for key in before} == before
    # Ints as frameworks may hand them back: numpy ints and 1-element integer tensors.
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict["param_groups"][0].update(rounding_seed=np.int64(7), rounding_launches=torch.tensor(4))
    optimizer.load_state_dict(state_dict)
    assert (optimizer.param_groups[0]["rounding_seed"], optimizer.param_groups[0]["rounding_launches"]) == (7, 4)
    assert type(optimizer.param_groups[0]["rounding_seed"]) is int
