"""Static checks of the GPU code, without a GPU, and the launch count of a step.

The kernel is compiled ahead of time for ``sm_90`` in every dtype mode (one
autotune config each, to bound CI time; ``perf/sweep.py --target`` checks every
config on every target) and its PTX, Triton IR and cubin are read by
``triton_adadelta.kernels.aot``.
"""

from __future__ import annotations

import pytest
import torch

import triton_adadelta
import triton_adadelta.update
from triton_adadelta.kernels import aot
from triton_adadelta.kernels.adadelta import DEFAULT_BLOCK_SIZE, DEFAULT_NUM_WARPS, adadelta_kernel


@pytest.fixture(scope="module")
def sm90_reports() -> dict[str, aot.KernelReport]:
    # The heuristic default config (the one that runs when tuning is switched off),
    # every mode compiled in one go: under TRITON_INTERPRET that is one child process.
    jobs = [(mode, DEFAULT_BLOCK_SIZE, DEFAULT_NUM_WARPS, "sm_90") for mode in aot.DTYPE_MODES]
    return {report.mode: report for _, report in aot.compile_many(jobs)}


@pytest.fixture(params=list(aot.DTYPE_MODES))
def sm90_report(request, sm90_reports) -> aot.KernelReport:
    return sm90_reports[request.param]


def test_streamed_buffers_use_128_bit_accesses(sm90_report: aot.KernelReport) -> None:
    report = sm90_report
    threads = 32 * report.num_warps
    load_bytes = report.block_size * sum(aot._ELEMENT_BYTES[t] for t in report.streamed_loads) // threads
    store_bytes = report.block_size * sum(aot._ELEMENT_BYTES[t] for t in report.streamed_stores) // threads
    # Every streamed byte moves in a 128-bit access (scalar loads of lr, found_inf,
    # grad_scale and the fp64 hyper-parameters may be narrower, and are not counted).
    assert report.bytes_in_128bit_loads >= load_bytes, report
    assert report.bytes_in_128bit_stores >= store_bytes, report
    assert report.store_widths == {128: store_bytes // 16}, report
    assert report.vector_bits == 128


def test_no_register_spills(sm90_report: aot.KernelReport) -> None:
    assert sm90_report.spill_bytes == 0, sm90_report
    assert 0 < sm90_report.registers <= 255


def test_bytes_per_element_equal_the_floor(sm90_report: aot.KernelReport) -> None:
    # Each input loaded once and each output stored once (DESIGN.md's table).
    assert sm90_report.bytes_per_element == aot.DTYPE_MODES[sm90_report.mode].floor_bytes, sm90_report


def test_block_offsets_are_64_bit(sm90_report: aot.KernelReport) -> None:
    # pid * BLOCK_SIZE in 64 bits: a buffer past 2**31 elements addresses correctly,
    # proven from the code without allocating one.
    assert sm90_report.offsets_64bit, sm90_report


def _model(dtypes: list[torch.dtype]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(7, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 1), torch.nn.LayerNorm(1)]
    for layer, dtype in zip(layers, dtypes * len(layers)):
        layer.to(dtype)
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float32, torch.bfloat16]], ids=["one-buffer", "two-buffers"])
def test_one_kernel_launch_per_flat_buffer_per_step(monkeypatch, dtypes: list[torch.dtype]) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _model(dtypes)
    optimizer = triton_adadelta.Adadelta(model.parameters(), lr=0.1)
    assert optimizer.backends() == ["triton-interpreter"]

    launcher_calls = []
    launches = []
    # The module that picks the backend calls the launcher through its global name.
    real_launcher = triton_adadelta.update.adadelta_step_
    real_run = adadelta_kernel.fn.run

    def counting_launcher(*args, **kwargs):
        launcher_calls.append(args[0].numel())
        return real_launcher(*args, **kwargs)

    def counting_run(*args, **kwargs):
        launches.append(kwargs.get("grid"))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(triton_adadelta.update, "adadelta_step_", counting_launcher)
    monkeypatch.setattr(adadelta_kernel.fn, "run", counting_run)
    n_buffers = len(optimizer.flat_buffers())
    assert n_buffers == len(set(dtypes))
    steps = 3
    for _ in range(steps):
        optimizer.zero_grad()
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()
    assert len(launcher_calls) == steps * n_buffers
    assert len(launches) == steps * n_buffers
    # Each launch covers its whole buffer.
    sizes = sorted(buffer.n_elements for buffer in optimizer.flat_buffers())
    assert sorted(launcher_calls[:n_buffers]) == sizes
