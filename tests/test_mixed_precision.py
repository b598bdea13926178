"""Mixed precision: fp32 state for bf16/fp16 params, master weights, stochastic
rounding, GradScaler, complex params; on the kernel (interpreter) and the CPU path."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from triton_adadelta import Adadelta
from triton_adadelta.update import step_flat_

HYPER = {"lr": 1.0, "rho": 0.9}


def regression_loss(dtype: torch.dtype, make, steps: int = 300, seed: int = 0, device: torch.device = torch.device("cpu")) -> float:
    """The issue's bf16 linear regression: 512x64, full batch, 300 steps, lr 1, rho 0.9."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=generator)
    y = x @ torch.randn(64, 1, generator=generator) + 0.1 * torch.randn(512, 1, generator=generator)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 1).to(device, dtype)
    optimizer = make(model.parameters())
    x_low = x.to(dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x_low).float(), y).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x_low).float(), y).item()


def test_bf16_master_weights_and_stochastic_rounding_track_the_fp32_run(backend):
    fp32 = regression_loss(torch.float32, lambda p: torch.optim.Adadelta(p, **HYPER))
    gap = lambda loss: abs(loss / fp32 - 1)  # noqa: E731
    torch_bf16 = gap(regression_loss(torch.bfloat16, lambda p: torch.optim.Adadelta(p, **HYPER)))
    ours_bf16 = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, **HYPER)))
    stochastic = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, stochastic_rounding=True, **HYPER)))
    master = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, master_weights=True, **HYPER)))
    report = f"final loss off the fp32 run: torch bf16 {torch_bf16:.2%}, ours bf16 {ours_bf16:.2%}, stochastic {stochastic:.2%}, master {master:.2%}"
    print(report)
    assert master <= 0.005, report
    assert stochastic <= 0.08, report
    assert ours_bf16 < torch_bf16, report


def assert_stochastic_rounding_is_unbiased(dtype: torch.dtype, backend: str | None = None, device: torch.device = torch.device("cpu")) -> None:
    """Every element is an independent stochastic rounding of the same value: their mean is that value."""
    n = 1 << 17
    param = torch.ones(n, dtype=dtype, device=device)
    grad = torch.full((n,), 1e3, dtype=dtype, device=device)
    square_avg, acc_delta = torch.zeros(n, device=device), torch.zeros(n, device=device)
    # One step from zero state: d = sqrt(eps) / sqrt((1-rho) g^2 + eps) * g, the same
    # fp32 value in every element; each element is an independent rounding of 1 - d.
    hyper = {"lr": 1.0, "rho": 0.0, "eps": 1e-6, "weight_decay": 0.0}
    step_flat_(param, grad, square_avg, acc_delta, **hyper, stochastic_rounding=True, seed=1234, backend=backend)
    exact = 1.0 - (torch.tensor(1e-6).sqrt() / torch.tensor(1e6 + 1e-6).sqrt() * 1e3).item()
    values = param.double().cpu()
    low, high = values.min().item(), values.max().item()
    assert low < exact < high, "the stores are the two neighbours of the fp32 value"
    assert set(values.unique().tolist()) == {low, high}
    # The mean of n independent two-point draws: 6 standard errors.
    fraction = (exact - low) / (high - low)
    standard_error = (high - low) * (fraction * (1 - fraction) / n) ** 0.5
    assert abs(values.mean().item() - exact) < 6 * standard_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "torch"], ids=["kernel", "cpu"])
def test_stochastic_rounding_is_unbiased(backend, dtype):
    assert_stochastic_rounding_is_unbiased(dtype, backend)


def test_stochastic_rounding_is_reproducible_under_manual_seed(backend):
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        param = torch.nn.Parameter(torch.randn(5000).bfloat16())
        optimizer = Adadelta([param], stochastic_rounding=True)
        for _ in range(3):
            param.grad = torch.randn(5000).bfloat16()
            optimizer.step()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1])


def test_mode_options_are_checked():
    with pytest.raises(ValueError, match="exclusive"):
        Adadelta([torch.nn.Parameter(torch.zeros(2))], master_weights=True, stochastic_rounding=True)


@pytest.mark.parametrize(
    "dtype,options",
    [
        (torch.float32, {}),
        (torch.float64, {}),
        (torch.bfloat16, {}),
        (torch.float16, {}),
        (torch.bfloat16, {"master_weights": True}),
        (torch.float16, {"master_weights": True}),
        (torch.bfloat16, {"stochastic_rounding": True}),
    ],
    ids=["fp32", "fp64", "bf16", "fp16", "bf16_master", "fp16_master", "bf16_stochastic"],
)
# The optimizer's state loaded before the model's: the model's load writes each param
# its master's rounding, which must not replace the loaded fp32 master copy.
@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_state_dict_round_trip_resumes_bit_identically(backend, dtype, options, order):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)
    x, y = torch.randn(16, 9).to(dtype), torch.randn(16, 3).to(dtype)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x).float(), y.float()).backward()
            o.step()

    optimizer = Adadelta(model.parameters(), **options)
    train(model, optimizer, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    # Uninterrupted run.
    torch.manual_seed(1)
    train(model, optimizer, 4)
    # Resumed run, in a fresh model and optimizer.
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).to(dtype)
    resumed_optimizer = Adadelta(resumed.parameters(), **options)
    if order == "model_first":
        resumed.load_state_dict(checkpoint["model"])
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
        resumed.load_state_dict(checkpoint["model"])
    torch.manual_seed(1)
    train(resumed, resumed_optimizer, 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters()):
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, resumed_optimizer.state[b][key]), key


def test_an_edit_from_outside_reaches_the_master_copy_where_it_changed_the_param(backend):
    """Elements an in-place write changed take the param's value; the others keep the
    master's fp32 value (they hold its rounding, as the optimizer stored it)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    optimizer = Adadelta([param], master_weights=True)
    for _ in range(3):
        param.grad = torch.randn(64).to(torch.bfloat16)
        optimizer.step()
    (flat,) = optimizer.flat_states()
    master_before = flat.master[:64].clone()
    assert not torch.equal(master_before, param.detach().float()), "the master holds more than the param"
    with torch.no_grad():
        param[:8] = 2.0
    param.grad = torch.zeros(64, dtype=torch.bfloat16)
    optimizer.step()  # a zero grad with zero state changes nothing but the merge
    assert torch.equal(flat.master[:8], torch.full((8,), 2.0))
    assert torch.equal(flat.master[8:64], master_before[8:])
    assert torch.equal(param[:8].float(), torch.full((8,), 2.0))


def test_a_loaded_master_copy_that_the_params_do_not_round_to_gives_way_to_the_params(backend):
    """A loaded ``master_param`` is kept where the param holds its rounding (a resume of
    model and optimizer from one checkpoint: bit for bit, tested above) and gives way
    where the param differs. torch.distributed.checkpoint's partial load of torch's
    checkpoint (no master_param) into ours hands back the optimizer's own stale master
    copy beside the checkpoint's params: that master reverted the model at the next step."""
    torch.manual_seed(0)
    checkpoint_params = torch.randn(64).to(torch.bfloat16)
    state = {"step": torch.tensor(3.0), "square_avg": torch.rand(64), "acc_delta": torch.full((64,), 1e-4)}
    results = []
    for master in (torch.randn(64), None):  # a stale master copy; none (torch's dict)
        param = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
        optimizer = Adadelta([param], master_weights=True)
        groups = optimizer.state_dict()["param_groups"]
        with torch.no_grad():
            param.copy_(checkpoint_params)  # the model's load
        loaded = {**state, **({} if master is None else {"master_param": master})}
        optimizer.load_state_dict({"state": {0: loaded}, "param_groups": groups})
        assert optimizer.flat_states()[0].master is not None
        param.grad = torch.full((64,), 0.5, dtype=torch.bfloat16)
        optimizer.step()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1])
    assert (results[0].float() - checkpoint_params.float()).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_is_fp32_for_low_precision_params(backend, dtype):
    param = torch.nn.Parameter(torch.randn(10).to(dtype))
    optimizer = Adadelta([param])
    param.grad = torch.ones(10, dtype=dtype)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.float32
    assert optimizer.state[param]["acc_delta"].dtype == torch.float32
    assert "master_param" not in optimizer.state[param]


def amp_training(make_optimizer, inf_at: int | None, steps: int = 6, device: torch.device = torch.device("cpu")):
    """``steps`` steps under a GradScaler; at step ``inf_at`` a grad is made inf (the step is skipped)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    x, y = torch.randn(32, 8).to(device), torch.randn(32, 4).to(device)
    scales = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step == inf_at:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, optimizer, scales


def test_grad_scaler_unscales_in_the_kernel_and_matches_torch(backend):
    model, optimizer, scales = amp_training(lambda p: Adadelta(p, lr=0.5), inf_at=None)
    reference, torch_optimizer, torch_scales = amp_training(lambda p: torch.optim.Adadelta(p, lr=0.5), inf_at=None)
    assert scales == torch_scales
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_grad_scaler_found_inf_changes_nothing(backend):
    model, optimizer, scales = amp_training(lambda p: Adadelta(p, lr=0.5), inf_at=3)
    reference, torch_optimizer, torch_scales = amp_training(lambda p: torch.optim.Adadelta(p, lr=0.5), inf_at=3)
    assert scales == torch_scales, "the scaler saw the inf and backed off"
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
        # The skipped step did not count.
        assert float(optimizer.state[a]["step"]) == float(torch_optimizer.state[b]["step"]) == 5.0


def test_found_inf_skips_params_state_and_step_count(backend):
    param = torch.nn.Parameter(torch.randn(100))
    optimizer = Adadelta([param])
    param.grad = torch.randn(100)
    optimizer.step()
    before = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.grad_scale = torch.tensor(8.0)
    param.grad = torch.randn(100)
    optimizer.step()
    assert torch.equal(param.detach(), before[0])
    for key, value in before[1].items():
        assert torch.equal(optimizer.state[param][key], value), key


def test_complex_params_update_real_and_imaginary_parts_as_torch(backend):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.complex64))
    reference = torch.nn.Parameter(param.detach().clone())
    real = torch.nn.Parameter(torch.randn(7))
    real_reference = torch.nn.Parameter(real.detach().clone())
    optimizer = Adadelta([param, real], weight_decay=0.1)
    torch_optimizer = torch.optim.Adadelta([reference, real_reference], weight_decay=0.1)
    for _ in range(5):
        grad, real_grad = torch.randn(6, 5, dtype=torch.complex64), torch.randn(7)
        param.grad, reference.grad = grad.clone(), grad.clone()
        real.grad, real_reference.grad = real_grad.clone(), real_grad.clone()
        optimizer.step()
        torch_optimizer.step()
    torch.testing.assert_close(param, reference, rtol=2e-5, atol=1e-6)
    assert optimizer.state[param]["square_avg"].dtype == torch.complex64
    torch.testing.assert_close(optimizer.state[param]["square_avg"], torch_optimizer.state[reference]["square_avg"], rtol=2e-5, atol=1e-6)
    # state_dict interop with torch for complex params.
    copy.deepcopy(torch_optimizer).load_state_dict(optimizer.state_dict())


def test_a_model_with_complex_and_real_params_saves_with_torch_save(backend, tmp_path):
    """Complex params get flat states of their own: torch.save refuses one storage viewed
    as both real and complex tensors, in the model's state_dict and in ours."""
    complex_param = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    real_param = torch.nn.Parameter(torch.randn(5))
    optimizer = Adadelta([complex_param, real_param])
    complex_param.grad, real_param.grad = torch.randn(3, 2, dtype=torch.complex64), torch.randn(5)
    optimizer.step()
    assert len(optimizer.flat_states()) == 2
    torch.save({"params": [complex_param, real_param], "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")
    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(loaded["params"][0], complex_param.detach())
    assert torch.equal(loaded["optimizer"]["state"][0]["square_avg"], optimizer.state[complex_param]["square_avg"])


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector) of int64 ``x`` < 2**32, transcribed here
    from its definition, not taken from the package."""
    def times(x: torch.Tensor, multiplier: int) -> torch.Tensor:
        # mod 2**32, in 16-bit halves of the multiplier: the whole product could pass int64.
        return (x * (multiplier & 0xFFFF) + (((x * (multiplier >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF

    x = x ^ (x >> 16)
    x = times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = times(x, 0x846CA68B)
    return x ^ (x >> 16)


@pytest.mark.parametrize("backend", ["triton", "torch"], ids=["kernel", "cpu"])
def test_stochastic_rounding_draws_the_documented_noise(backend, monkeypatch):
    """bf16 stochastic rounding adds 16 bits of noise below the kept bits and truncates:
    element i of the flat state takes half i % 2 (low first) of lowbias32(2**31 + i // 2
    + lowbias32(seed)), mod 2**32 (kernels/adadelta.py, README). The fp32 step on the
    same widened inputs gives the value that is rounded."""
    if backend == "torch":
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1")
        from triton_adadelta import cpu

        if cpu.implementation(torch.device("cpu"), torch.bfloat16, master=False, stochastic_rounding=True,
                              state_dtype=torch.float32) != "cpu-native":  # fmt: skip
            pytest.skip("no C loop here: the chunked ops draw torch's noise")
    generator = torch.Generator().manual_seed(3)
    n, seed = 4099, 123_456_789
    param = torch.randn(n, generator=generator).bfloat16()
    grad = torch.randn(n, generator=generator).bfloat16()
    square_avg, acc_delta = torch.rand(n, generator=generator), torch.rand(n, generator=generator) * 1e-2
    hyper = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}
    exact = param.float()
    step_flat_(exact, grad.float(), square_avg.clone(), acc_delta.clone(), **hyper, backend=backend)
    step_flat_(param, grad, square_avg, acc_delta, **hyper, stochastic_rounding=True, seed=seed, backend=backend)

    index = torch.arange(n, dtype=torch.int64)
    key = _lowbias32(torch.tensor(seed, dtype=torch.int64))
    words = _lowbias32(((index >> 1) + 2**31 + key) & 0xFFFFFFFF)
    noise = torch.where(index % 2 == 0, words & 0xFFFF, words >> 16)
    bits = exact.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expected = ((bits + noise) >> 16).to(torch.int16)  # (no NaN here, and no carry past 2**32 for these values)
    assert torch.equal(param.view(torch.int16), expected)
