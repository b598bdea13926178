"""The kernel on a GPU: what CI checks through the interpreter, run compiled on CUDA tensors.

Every test here is marked ``gpu``; ``perf/gpu_check.py`` runs them with ``pytest -m gpu``
and ``TRITON_INTERPRET=0``. The ``@gpu_or_cpu`` ones run on ``device_under_test()``:
``TRITON_ADADELTA_TEST_DEVICE=cpu`` runs them on the CPU through the interpreter,
which is how CI checks them without a GPU (``tests/test_gpu_check.py``). The ``@gpu``
ones need CUDA itself: CUDA-graph replay, two devices, and the longer runs that CI
already makes on the CPU.

Covered on the device: every dtype mode against the fp64 oracle (one step and
trajectories, GradScaler scales), every autotune config and the tuned choice giving
the default config's bits, parity with ``torch.optim.Adadelta`` on the same device,
GradScaler's unscale and inf skip (eager and in a replayed CUDA graph), the
compiled kernel's bits against the C loop's and the interpreter's, a `torch.compile`d step's bits against the
eager step's, unbiased stochastic rounding, FSDP2 on one rank (DTensor shards, compressed
state), and params on two devices.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl

import triton_adadelta.kernels.adadelta as kernel_module
from conftest import device_under_test, gpu, gpu_or_cpu
from test_capturable import capture_step
from test_mixed_precision import HYPER, amp_training, assert_stochastic_rounding_is_unbiased, regression_loss
from test_optimizer import assert_models_and_states_match, groups, make_pair, train_step
from tolerances import parity_tolerance
from triton_adadelta import Adadelta, cpu
from triton_adadelta.kernels.adadelta import QUANT_BLOCK
from triton_adadelta.update import step_flat_

try:  # the oracle properties need numpy and hypothesis, which a GPU machine may lack
    from hypothesis import given
    from hypothesis import strategies as st

    from test_oracle_properties import MODES as ORACLE_MODES
    from test_oracle_properties import SIZES, hyper_parameters, run_and_check

    MISSING = None
except ImportError as error:
    MISSING = error.name

DEVICE = device_under_test()
TESTS = Path(__file__).resolve().parent

# Every dtype mode: the params' dtype and the optimizer's options.
MODES: dict[str, tuple[torch.dtype, dict[str, object]]] = {
    "fp32": (torch.float32, {}),
    "fp64": (torch.float64, {}),
    "bf16": (torch.bfloat16, {}),
    "fp16": (torch.float16, {}),
    "bf16_master": (torch.bfloat16, {"master_weights": True}),
    "fp16_master": (torch.float16, {"master_weights": True}),
    "bf16_stochastic": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp16_stochastic": (torch.float16, {"stochastic_rounding": True}),
    # Compressed state (issue 15): bf16 state rounds stochastically, 8-bit state is
    # block-quantized; the same bits on every device too.
    "fp32_bf16_state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "bf16_stochastic_bf16_state": (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
    "fp32_u8_state": (torch.float32, {"state_dtype": torch.uint8}),
    "bf16_master_u8_state": (torch.bfloat16, {"master_weights": True, "state_dtype": torch.uint8}),
}
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.uint8: torch.uint8}


def assert_same_bits(actual: list[torch.Tensor], expected: list[torch.Tensor], label: str) -> None:
    """Each tensor of ``actual`` holds exactly the bits of ``expected``'s (any NaN matching any NaN)."""
    assert len(actual) == len(expected), label
    for index, (ours, reference) in enumerate(zip(actual, expected)):
        ours, reference = ours.detach().cpu(), reference.detach().cpu()
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, f"{label}: tensor {index}"
        bits = _BITS[ours.dtype]
        differ = (ours.view(bits) != reference.view(bits)) & ~(ours.isnan() & reference.isnan())
        if differ.any():
            first = int(differ.nonzero()[0, 0])
            raise AssertionError(
                f"{label}: tensor {index} ({ours.dtype}): {int(differ.sum())} of {ours.numel()} elements differ; "
                f"first at {first}: {ours[first].item()!r} vs {reference[first].item()!r}"
            )


def untuned() -> contextlib.AbstractContextManager[object]:
    """The default config only: the hypothesis tests launch hundreds of sizes, which tuning would time one by one."""
    return mock.patch.dict(os.environ, {"TRITON_ADADELTA_AUTOTUNE": "0"})


# ------------------------------------------------------------------ the kernel
@gpu_or_cpu
def test_the_device_runs_the_kernel_it_is_meant_to():
    # A TRITON_INTERPRET=1 left in the environment would run the interpreter on the GPU's tensors.
    param = torch.nn.Parameter(torch.randn(100, device=DEVICE))
    param.grad = torch.randn_like(param)
    optimizer = Adadelta([param])
    optimizer.step()
    if DEVICE.type == "cuda":
        assert optimizer.backends() == ["triton"]
        assert type(kernel_module.adadelta_kernel.fn).__name__ == "JITFunction"
    else:
        assert optimizer.backends() == ["triton-interpreter"]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Three params: a large one, one starting an element into its storage (the
    unaligned branch) and a small one; several blocks each on a GPU."""
    sizes = (70_001, 4_099, 33) if DEVICE.type == "cuda" else (1_029, 301, 33)
    generator = torch.Generator().manual_seed(0)
    storages = [torch.randn(size + 1, generator=generator).to(DEVICE, dtype) for size in sizes]
    params = [torch.nn.Parameter(storages[0][:-1]), torch.nn.Parameter(storages[1][1:]), torch.nn.Parameter(storages[2][:-1])]
    assert params[1].data_ptr() % 16 != 0
    return params


def _two_steps(dtype: torch.dtype, options: dict[str, bool]) -> list[torch.Tensor]:
    """Two steps of ours in this mode from a fixed start: the params and every state buffer."""
    torch.manual_seed(0)  # the stochastic rounding's seed
    params = _params(dtype)
    optimizer = Adadelta(params, lr=0.5, weight_decay=0.01, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        for param in params:
            param.grad = (torch.randn(param.shape, generator=generator) * 10.0).to(DEVICE, dtype)
        optimizer.step()
    results = [param.detach().clone() for param in params]
    for param in params:
        state = optimizer.state[param]
        results += [state[key].clone() for key in sorted(state) if key != "step"]
    return results


def _warp_size() -> int:
    return 32 if DEVICE.type == "cpu" else triton.runtime.driver.active.get_current_target().warp_size


@gpu_or_cpu
@pytest.mark.parametrize("mode", list(MODES))
def test_every_config_and_the_tuned_choice_give_the_default_configs_bits(mode, monkeypatch):
    # Every config computes each element with the same operations, so each must give
    # the same bits; and tuning, which runs every config on the live buffers, must
    # restore them, or the step would be applied more than once.
    dtype, options = MODES[mode]
    monkeypatch.setenv("TRITON_ADADELTA_AUTOTUNE", "0")
    reference = _two_steps(dtype, options)
    configs = kernel_module.configs_for(
        dtype, _warp_size(), master=options.get("master_weights", False), stochastic_rounding=options.get("stochastic_rounding", False),
        compressed_state=options.get("state_dtype") == torch.bfloat16, quantized_state=options.get("state_dtype") == torch.uint8,
    )
    assert configs
    for config in configs:
        with monkeypatch.context() as patch:
            patch.setattr(kernel_module, "default_config", lambda *_, **__: config)
            assert_same_bits(_two_steps(dtype, options), reference, f"{mode} {config}")
    monkeypatch.setenv("TRITON_ADADELTA_AUTOTUNE", "1")
    assert_same_bits(_two_steps(dtype, options), reference, f"{mode}, tuned")


# ------------------------------------------------------------ the fp64 oracle
if MISSING is None:

    @gpu_or_cpu
    @pytest.mark.parametrize("mode", ORACLE_MODES, ids=lambda m: m.name)
    @given(size=SIZES, hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), specials=st.booleans())
    def test_one_step_within_roundoff_of_fp64_oracle_on_the_device(mode, size, hyper, seed, specials):
        with untuned():
            run_and_check("kernel", mode, size, hyper, seed, steps=1, specials=specials, device=DEVICE)

    @gpu_or_cpu
    @pytest.mark.parametrize("mode", [ORACLE_MODES[0], ORACLE_MODES[2], ORACLE_MODES[4], ORACLE_MODES[6]], ids=lambda m: m.name)
    @given(size=st.integers(1, 5000), hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), steps=st.integers(2, 6))
    def test_every_step_of_a_trajectory_within_roundoff_on_the_device(mode, size, hyper, seed, steps):
        with untuned():
            run_and_check("kernel", mode, size, hyper, seed, steps=steps, specials=False, device=DEVICE)

    @gpu_or_cpu
    @given(size=st.integers(1, 5000), hyper=hyper_parameters(), seed=st.integers(0, 2**32 - 1), log2_scale=st.integers(-20, 40))
    def test_grad_scale_divides_the_gradient_on_the_device(size, hyper, seed, log2_scale):
        with untuned():
            run_and_check("kernel", ORACLE_MODES[0], size, hyper, seed, steps=1, specials=True, grad_scale=2.0**log2_scale, device=DEVICE)

else:

    @gpu_or_cpu
    def test_oracle_properties_on_the_device():
        pytest.skip(f"{MISSING} not installed: the fp64-oracle properties did not run")


# ------------------------------------------------------------ parity with torch
@gpu_or_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_torch_on_the_same_device(dtype):
    model, reference = (m.to(DEVICE, dtype) for m in make_pair())
    optimizer = Adadelta(groups(model))
    torch_optimizer = torch.optim.Adadelta(groups(reference))
    torch.manual_seed(1)
    x, y = torch.randn(32, 7).to(DEVICE, dtype), torch.randn(32, 5).to(DEVICE, dtype)
    # Fewer steps through the interpreter, which is slow: CI runs 40 in test_optimizer.
    for step in range(20 if DEVICE.type == "cuda" else 4):
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            train_step(m, o, x, y, set_to_none=step % 2 == 0)
    assert optimizer.backends() == ["triton" if DEVICE.type == "cuda" else "triton-interpreter"]
    assert_models_and_states_match(model, reference, optimizer, torch_optimizer)


@gpu_or_cpu
def test_a_compiled_step_on_the_device_gives_the_eager_step_s_bits():
    # torch.compile(optimizer.step) traces to one op, triton_adadelta::step_ (compiled.py).
    model, twin = (m.to(DEVICE) for m in make_pair())
    compiled_optimizer, eager = Adadelta(model.parameters(), lr=0.5), Adadelta(twin.parameters(), lr=0.5)
    torch._dynamo.reset()
    compiled_step = torch.compile(compiled_optimizer.step)
    torch.manual_seed(2)
    x, y = torch.randn(32, 7).to(DEVICE), torch.randn(32, 5).to(DEVICE)
    for _ in range(5):
        for m, o, step in ((model, compiled_optimizer, compiled_step), (twin, eager, eager.step)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            step()
    torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@gpu_or_cpu
def test_grad_scaler_unscales_and_skips_an_inf_step_as_torch():
    for inf_at in (None, 3):
        model, optimizer, scales = amp_training(lambda p: Adadelta(p, lr=0.5), inf_at=inf_at, device=DEVICE)
        reference, torch_optimizer, torch_scales = amp_training(lambda p: torch.optim.Adadelta(p, lr=0.5), inf_at=inf_at, device=DEVICE)
        assert scales == torch_scales, "the scaler saw the same infs"
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, **parity_tolerance())
            # A skipped step does not count.
            assert float(optimizer.state[a]["step"]) == float(torch_optimizer.state[b]["step"]) == (6.0 if inf_at is None else 5.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_on_the_device(dtype):
    assert_stochastic_rounding_is_unbiased(dtype, device=torch.device("cuda"))


@gpu
def test_low_precision_modes_track_the_fp32_run_on_the_device():
    device = torch.device("cuda")
    fp32 = regression_loss(torch.float32, lambda p: torch.optim.Adadelta(p, **HYPER), device=device)
    gap = lambda loss: abs(loss / fp32 - 1)  # noqa: E731
    torch_bf16 = gap(regression_loss(torch.bfloat16, lambda p: torch.optim.Adadelta(p, **HYPER), device=device))
    ours_bf16 = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, **HYPER), device=device))
    stochastic = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, stochastic_rounding=True, **HYPER), device=device))
    master = gap(regression_loss(torch.bfloat16, lambda p: Adadelta(p, master_weights=True, **HYPER), device=device))
    report = f"final loss off the fp32 run: torch bf16 {torch_bf16:.2%}, ours bf16 {ours_bf16:.2%}, stochastic {stochastic:.2%}, master {master:.2%}"
    print(report)
    assert master <= 0.005, report
    assert stochastic <= 0.08, report
    assert ours_bf16 < torch_bf16, report


# ------------------------------------------------- the compiled kernel's bits
_HYPER_BITS = {"lr": 0.7, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01}


def bit_cases(n: int = 10_007) -> list[dict[str, object]]:
    """One step's inputs for every dtype mode (fp32 also with a GradScaler's scale), on the CPU:
    gradients from 1e-30 to 1e30 with zeros, states with zeros. 8-bit state: random
    codes, padded to whole quant blocks, with a power-of-two scale per block."""
    generator = torch.Generator().manual_seed(0)
    cases: list[dict[str, object]] = []
    for name, (dtype, options) in MODES.items():
        for grad_scale in (None, 1024.0) if name == "fp32" else (None,):
            state_dtype = options.get("state_dtype", torch.float64 if dtype == torch.float64 else torch.float32)
            quantized = state_dtype == torch.uint8
            n_state = -(-n // QUANT_BLOCK) * QUANT_BLOCK if quantized else n
            # 8-bit state: gradients from 1e-3 to 1e3. From 1e-30 to 1e30, nearly every
            # quant block of square_avg held an inf (a NaN scale, all codes 0), and
            # values 5 decades below a block's largest are all code 0 too.
            decades = 6 if quantized else 60
            magnitudes = 10.0 ** (torch.rand(n, generator=generator, dtype=torch.float64) * decades - decades / 2)
            grad = torch.randn(n, generator=generator, dtype=torch.float64).sign() * magnitudes
            grad[::7] = 0.0
            master = torch.randn(n_state, generator=generator)
            master[n:] = 0.0
            case: dict[str, object] = {
                "name": name + ("+grad_scale" if grad_scale else ""),
                "param": master[:n].to(dtype),
                "grad": grad.to(dtype),
                "master": master if options.get("master_weights") else None,
                "stochastic_rounding": options.get("stochastic_rounding", False),
                "grad_scale": grad_scale,
                "square_avg_scale": None,
                "acc_delta_scale": None,
            }
            for key, zeros_every in (("square_avg", 3), ("acc_delta", 5)):
                if quantized:
                    case[key] = torch.randint(0, 256, (n_state,), generator=generator, dtype=torch.uint8)
                    case[key][::zeros_every] = 0
                    exponents = torch.randint(-20, 4, (n_state // QUANT_BLOCK,), generator=generator)
                    case[key + "_scale"] = torch.exp2(exponents.float())
                else:
                    values = torch.rand(n, generator=generator, dtype=torch.float64) * 10
                    case[key] = values.to(state_dtype) * (torch.arange(n) % zeros_every != 0)
            cases.append(case)
    return cases


# What one step writes, in the order run_bit_cases returns it.
_WRITTEN = ("param", "square_avg", "acc_delta", "master", "square_avg_scale", "acc_delta_scale")


def run_bit_cases(
    cases: list[dict[str, object]], device: torch.device, backend: str | None = None
) -> list[list[torch.Tensor]]:
    """One ``step_flat_`` per case on ``device`` (and ``backend``): the written buffers, on the CPU."""
    results = []
    for case in cases:
        # Copies: on the CPU `.to` would hand back the case's own tensors, which the step writes.
        written = {key: case[key].to(device, copy=True) for key in _WRITTEN if case.get(key) is not None}
        grad_scale = None if case["grad_scale"] is None else torch.tensor([case["grad_scale"]], device=device)
        step_flat_(written["param"], case["grad"].to(device), written["square_avg"], written["acc_delta"], **_HYPER_BITS,
                   master=written.get("master"), stochastic_rounding=case["stochastic_rounding"], seed=1234,
                   grad_scale=grad_scale, square_avg_scale=written.get("square_avg_scale"),
                   acc_delta_scale=written.get("acc_delta_scale"), backend=backend)  # fmt: skip
        results.append([tensor.cpu() for tensor in written.values()])
    return results


@triton.jit
def _fma_probe(x_ptr, y_ptr, z_ptr, out_ptr):
    tl.store(out_ptr, tl.fma(tl.load(x_ptr), tl.load(y_ptr), tl.load(z_ptr)))


def interpreter_fma_rounds_once() -> bool:
    """Whether this process's interpreter rounds ``tl.fma`` once, in fp32 and fp64.

    (1 + 2**-k)**2 - 1 is exact in one rounding; rounding the product first drops its
    last bit (a tie, to even). Triton's interpreter has not always rounded once, and
    where it does not, it is no reference for the compiled kernel's bits.
    """
    for dtype, k in ((torch.float32, 12), (torch.float64, 27)):
        x = torch.tensor([1.0 + 2.0**-k], dtype=dtype)
        out = torch.empty_like(x)
        _fma_probe[(1,)](x, x, torch.tensor([-1.0], dtype=dtype), out)
        if out.item() != 2.0 ** -(k - 1) + 2.0 ** -(2 * k):
            return False
    return True


# Runs the cases through the interpreter in a process of its own: the kernel is
# compiled or interpreted for the whole of a process, as TRITON_INTERPRET says at import.
_INTERPRETER_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_gpu
cases = torch.load(sys.argv[2], weights_only=True)
exact = test_gpu.interpreter_fma_rounds_once()
torch.save({"fma_rounds_once": exact, "results": test_gpu.run_bit_cases(cases, torch.device("cpu"))}, sys.argv[3])
"""


def _native_cases(cases: list[dict[str, object]]) -> list[bool]:
    """Which cases the CPU path runs in its C loop, which gives the kernel's bits
    (``tests/test_cpu_path.py`` checks that against the interpreter in CI)."""
    return [
        cpu.implementation(torch.device("cpu"), case["param"].dtype, master=case["master"] is not None,
                           stochastic_rounding=bool(case["stochastic_rounding"]),
                           state_dtype=case["square_avg"].dtype) == "cpu-native"
        for case in cases
    ]  # fmt: skip


@gpu_or_cpu
def test_the_device_gives_the_reference_bits(tmp_path, monkeypatch):
    # What README's numerics contract says (no FMA contraction, correctly rounded sqrt
    # and division, bf16 conversions by integer ops): CI's CPU runs stand for the GPU.
    # The references are the CPU path's C loop and Triton's interpreter where its fma
    # rounds once (not in triton 3.6's). On the CPU (the plumbing run) the device is
    # the interpreter itself.
    monkeypatch.setenv("TRITON_ADADELTA_AUTOTUNE", "0")
    monkeypatch.delenv("TRITON_ADADELTA_CPU_SQRT", raising=False)
    cases = bit_cases(10_007 if DEVICE.type == "cuda" else 1_029)
    torch.save(cases, tmp_path / "cases.pt")
    interpreted = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_RUN, str(TESTS), str(tmp_path / "cases.pt"), str(tmp_path / "interpreted.pt")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert interpreted.returncode == 0, interpreted.stderr[-3000:]
    interpreter = torch.load(tmp_path / "interpreted.pt", weights_only=True)
    native = _native_cases(cases)
    native_results = run_bit_cases(cases, torch.device("cpu"), backend="torch")
    failures, compared = [], 0
    for index, (case, ours) in enumerate(zip(cases, run_bit_cases(cases, DEVICE))):
        references = {"C loop": native_results[index]} if native[index] else {}
        if interpreter["fma_rounds_once"]:
            references["interpreter"] = interpreter["results"][index]
        if not references:
            failures.append(f"{case['name']}: no reference here (no C loop, and the interpreter's fma rounds twice)")
        for reference_name, reference in references.items():
            compared += 1
            try:
                assert_same_bits(ours, reference, f"{case['name']} vs the {reference_name}")
            except AssertionError as error:
                failures.append(str(error))
    assert not failures, "\n".join(failures)
    assert compared >= len(cases)


# FSDP2 on one rank of the device (NCCL on CUDA, gloo on the CPU): the kernel updates
# the DTensor params' local shards, with their state at offsets of the flat state.
_FSDP2_MODES = ("fp32", "fp32_bf16_state", "fp32_u8_state", "bf16_master_u8_state")
_FSDP2_SCRIPT = r"""
import io, socket, sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from triton_adadelta import Adadelta

device = torch.device(sys.argv[1])
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
if device.type == "cuda":
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
modes = {
    "fp32": (torch.float32, {}),
    "fp32_bf16_state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32_u8_state": (torch.float32, {"state_dtype": torch.uint8}),
    "bf16_master_u8_state": (torch.bfloat16, {"master_weights": True, "state_dtype": torch.uint8}),
}
local = lambda value: value.to_local() if hasattr(value, "to_local") else value
for name, (dtype, options) in modes.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 129), torch.nn.Tanh(), torch.nn.Linear(129, 7)).to(device, dtype)
    fully_shard(model)
    params = list(model.parameters())
    twins = [torch.nn.Parameter(p.to_local().detach().clone()) for p in params]
    optimizer, twin_optimizer = Adadelta(params, lr=1.0, **options), Adadelta(twins, lr=1.0, **options)
    for each in (optimizer, twin_optimizer):
        each.param_groups[0]["rounding_seed"] = 12345
    for x in torch.randn(5, 16, 300, generator=torch.Generator().manual_seed(1)).to(device, dtype):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        for param, twin in zip(params, twins):
            twin.grad = param.grad.to_local().detach().clone()
        optimizer.step()
        twin_optimizer.step()
    same = all(torch.equal(p.to_local(), t) for p, t in zip(params, twins)) and all(
        torch.equal(local(value), twin_optimizer.state[t][key])
        for p, t in zip(params, twins) for key, value in optimizer.state[p].items()
    )
    buffer = io.BytesIO()
    torch.save(get_optimizer_state_dict(model, optimizer), buffer)
    print(name, "same" if same else "DIFFERENT", "saved" if buffer.tell() > 0 else "unsaved", flush=True)
dist.destroy_process_group()
"""


@gpu_or_cpu
def test_fsdp2_on_the_device_updates_shards_as_a_plain_optimizer_does_and_saves():
    # Each mode's shards and state (codes, scales, master copy) equal, bit for bit, a
    # plain optimizer's over copies of the shards; the DCP state dict saves.
    result = subprocess.run(
        [sys.executable, "-c", _FSDP2_SCRIPT, str(DEVICE)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.split() == [word for mode in _FSDP2_MODES for word in (mode, "same", "saved")], result.stdout


# --------------------------------------------------------- graphs and devices
@gpu
def test_a_replayed_cuda_graph_skips_the_step_on_found_inf():
    device = torch.device("cuda")
    param = torch.nn.Parameter(torch.randn(5000, device=device))
    param.grad = torch.randn_like(param)
    optimizer = Adadelta([param], lr=torch.tensor(0.5, device=device), capturable=True)
    optimizer.step()  # packs the buffers and compiles/tunes outside the capture
    optimizer.grad_scale = torch.tensor(4.0, device=device)
    optimizer.found_inf = torch.zeros((), device=device)
    graph = capture_step(optimizer)  # a warm-up step, then the captured one

    def snapshot() -> list[torch.Tensor]:
        """The param, then the state in a fixed order, its step count last."""
        torch.cuda.synchronize()
        state = optimizer.state[param]
        return [param.detach().clone()] + [state[key].clone() for key in sorted(state) if key != "step"] + [state["step"].clone()]

    optimizer.found_inf.fill_(1.0)
    before = snapshot()
    graph.replay()
    assert_same_bits(snapshot(), before, "replay with found_inf = 1")
    optimizer.found_inf.fill_(0.0)
    graph.replay()
    after = snapshot()
    assert not torch.equal(after[0], before[0]), "replay with found_inf = 0 updates the param"
    assert float(after[-1]) == float(before[-1]) + 1


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_params_on_two_devices_match_torch():
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    torch.manual_seed(0)
    starts = [torch.randn(size) for size in (4097, 1000)]
    ours = [torch.nn.Parameter(start.to(device)) for start, device in zip(starts, devices)]
    theirs = [torch.nn.Parameter(start.to(device)) for start, device in zip(starts, devices)]
    optimizer = Adadelta(ours, lr=0.5, weight_decay=0.01)
    torch_optimizer = torch.optim.Adadelta(theirs, lr=0.5, weight_decay=0.01)
    with torch.cuda.device(0):  # the params on cuda:1 launch on their own device all the same
        for _ in range(5):
            for a, b in zip(ours, theirs):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            optimizer.step()
            torch_optimizer.step()
    assert sorted(str(flat.device) for flat in optimizer.flat_states()) == ["cuda:0", "cuda:1"]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **parity_tolerance())
