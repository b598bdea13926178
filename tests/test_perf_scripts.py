"""The GPU sweep's plumbing (perf/sweep.py), run on CPU tensors through the interpreter.

No GPU is needed to check everything around the timer: that every config launches,
that restoring the buffers makes every timed launch start from the same state, the
best config per size bucket, the rows, the table and the plot. Only do_bench (CUDA
events) is replaced, by a wall-clock median.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

import sweep  # noqa: E402


def wall_clock_bench(fn, return_mode: str = "median", **_) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@pytest.fixture
def cpu_sweep(monkeypatch):
    monkeypatch.setattr(triton.testing, "do_bench", wall_clock_bench)
    monkeypatch.setattr(sweep, "device_warp_size", lambda: 32)
    monkeypatch.setattr(sweep, "copy_bandwidth", lambda device: 100e9)


@pytest.mark.parametrize("mode", ["fp32", "bf16+master"])
def test_restored_buffers_make_every_launch_start_from_the_same_state(mode):
    buffers = sweep.Buffers(sweep.aot.DTYPE_MODES[mode], 3000, torch.device("cpu"))
    buffers.launch(1024, 4)
    first = [tensor.clone() for tensor in buffers.written]
    assert not all(torch.equal(a, b) for a, b in zip(first, buffers.saved)), "the launch wrote something"
    buffers.restore()
    assert all(torch.equal(a, b) for a, b in zip(buffers.written, buffers.saved))
    buffers.launch(1024, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, buffers.written))


def test_gpu_sweep_reports_the_best_config_per_bucket_with_table_and_plot(cpu_sweep, tmp_path):
    result = sweep.sweep_gpu([3000], ["fp32"], torch.device("cpu"))
    (row,) = result["rows"]
    labels = {sweep.config_label(c) for c in sweep.configs_for(torch.float32, 32)}
    assert set(row["config_ms"]) == labels
    assert row["best_config"] == min(row["config_ms"], key=row["config_ms"].get)
    assert row["GBps"] > 0 and row["pct_of_copy"] > 0
    assert row["torch_foreach_ms"] > 0 and row["torch_forloop_ms"] > 0
    bucket = result["best_config_per_bucket"]["fp32"][str(row["size_bucket"])]
    assert sweep.config_label(triton.Config({"BLOCK_SIZE": bucket["BLOCK_SIZE"]}, num_warps=bucket["num_warps"])) == row["best_config"]
    assert "fp32" in sweep.format_gpu_table(result)
    sweep.plot_gpu(result, tmp_path / "sweep.png", "interpreter dry run")
    assert (tmp_path / "sweep.png").stat().st_size > 0
