"""The GPU sweep's plumbing (perf/sweep.py), run on CPU tensors through the interpreter.

No GPU is needed to check everything around the timer: that every config launches,
that restoring the buffers makes every timed launch start from the same state, the
best config per size bucket, the rows, the goals summary, the table and the plot.
On the CPU the sweep times with a wall-clock median instead of do_bench (CUDA events).
The C loop's A/B (perf/ab_native.py) is run for real, on a few thousand params;
bench_step's ``--threads`` up to the point where it would start timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

import sweep  # noqa: E402


@pytest.fixture
def cpu_sweep(monkeypatch):
    # A copy of 1 GiB would take seconds on CPU; the figure is not under test here.
    monkeypatch.setattr(sweep, "copy_bandwidth", lambda device, n_bytes=0: 100e9)


@pytest.mark.parametrize("mode", ["fp32", "bf16+master", "bf16+master+u8state"])
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
    rows_seen = []
    result = sweep.sweep_gpu([3000], ["fp32"], torch.device("cpu"), compiled_torch=False, on_row=lambda r: rows_seen.append(len(r["rows"])))
    assert rows_seen == [1]
    (row,) = result["rows"]
    labels = {sweep.config_label(c) for c in sweep.configs_for(torch.float32, 32)}
    assert set(row["config_ms"]) == labels
    assert row["best_config"] == min(row["config_ms"], key=row["config_ms"].get)
    assert row["GBps"] > 0 and row["pct_of_copy"] > 0
    assert row["torch_foreach_ms"] > 0 and row["torch_forloop_ms"] > 0
    assert "torch_compiled_ms" not in row
    bucket = result["best_config_per_bucket"]["fp32"][str(row["size_bucket"])]
    assert sweep.config_label(triton.Config({"BLOCK_SIZE": bucket["BLOCK_SIZE"]}, num_warps=bucket["num_warps"])) == row["best_config"]
    assert "fp32" in sweep.format_gpu_table(result)
    sweep.plot_gpu(result, tmp_path / "sweep.png", "interpreter dry run")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_all_configs_times_the_dropped_configs_but_keeps_the_tuners_choice(cpu_sweep, monkeypatch):
    # Every config is timed; the row's best stays among those configs_for keeps, and
    # best_any_* name the fastest of all (here a dropped one, made fastest).
    kept = {sweep.config_label(c) for c in sweep.configs_for(torch.bfloat16, 32)}
    dropped = {sweep.config_label(c) for c in sweep.AUTOTUNE_CONFIGS} - kept
    assert dropped
    launched = []
    monkeypatch.setattr(sweep.Buffers, "launch", lambda self, block_size, num_warps: launched.append(f"B{block_size}_w{num_warps}"))

    def time_restored(launch, restore, restore_ms, device):
        launch()
        label = launched[-1]
        return 1.0 if label in dropped else 2.0 + sorted(kept).index(label)

    monkeypatch.setattr(sweep, "time_restored", time_restored)
    result = sweep.sweep_gpu([3000], ["bf16"], torch.device("cpu"), compiled_torch=False, all_configs=True)
    (row,) = result["rows"]
    assert set(row["config_ms"]) == kept | dropped
    assert row["best_config"] == sorted(kept)[0] and row["best_ms"] == 2.0
    assert row["best_any_config"] in dropped and row["best_any_ms"] == 1.0
    assert row["best_any_pct_of_copy"] == 2 * row["pct_of_copy"]
    assert "every config (--all-configs)" in sweep.format_gpu_table(result)


def test_the_ncu_reader_gives_instructions_per_element_and_their_bound():
    import ncu_state_modes

    text = (REPO / "perf" / "results" / "gpu" / "ncu_state_modes.txt").read_text()
    rows = ncu_state_modes.summarize(text, sm_clock_ghz=1.98, copy_gbps=4225.0)
    assert [row["mode"] for row in rows] == [mode for mode in ncu_state_modes.MODES for _ in range(2)]
    # The third kernel (bf16 params, 8-bit state) by hand: its lines read apart here.
    third = text.split("adadelta_kernel (")[3]

    def metric(name: str) -> float:
        (line,) = [line for line in third.splitlines() if line.split() and " ".join(line.split()[:-2]) == name]
        return float(line.split()[-1].replace(",", ""))

    warp_instructions = metric("Elapsed Cycles") * metric("Executed Ipc Elapsed") * metric("# SMs")
    assert rows[2]["instructions_per_element"] == pytest.approx(warp_instructions * 32 / 2**24)
    issue_s = warp_instructions / (4 * metric("# SMs") * 1.98e9)
    floor_s = 10.0625 * 2**24 / 4225e9  # bf16 params, 8-bit state: 10.0625 B per element
    assert rows[2]["max_pct_of_copy"] == pytest.approx(100 * floor_s / issue_s)
    assert rows[2]["registers"] == metric("Registers Per Thread")
    with pytest.raises(ValueError, match="Elapsed Cycles"):
        ncu_state_modes.summarize(text.replace("Elapsed Cycles", "Elapsed"), sm_clock_ghz=1.98, copy_gbps=4225.0)


def test_compiled_torch_baseline_runs_torchs_own_update(monkeypatch):
    # Compiling on CPU takes minutes here: the same call, uncompiled, must be torch's step.
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    monkeypatch.setattr(sweep, "_compiled_torch_step", None)
    milliseconds, first_call_s = sweep.time_torch_compiled(sweep.aot.DTYPE_MODES["fp32"], 1000, torch.device("cpu"))
    assert milliseconds > 0 and first_call_s >= 0
    params, grads = [torch.ones(5)], [torch.full((5,), 2.0)]
    state = ([torch.zeros(5)], [torch.zeros(5)], [torch.zeros(())])
    sweep._torch_adadelta_step(params, grads, *state)
    reference = torch.nn.Parameter(torch.ones(5))
    reference.grad = torch.full((5,), 2.0)
    torch.optim.Adadelta([reference], lr=1.0, rho=0.9, eps=1e-6).step()
    assert torch.equal(params[0], reference.detach())
    assert float(state[2][0]) == 1.0


def _row(mode: str, n_elements: int, pct: float, foreach: float | None) -> dict:
    row = {"mode": mode, "n_elements": n_elements, "pct_of_copy": pct, "GBps": pct * 30}
    if foreach is not None:
        row["torch_foreach_speedup"] = foreach
    return row


def test_goals_are_judged_on_the_worst_large_row_of_every_mode():
    small = _row("fp32", 1 << 12, 10.0, 0.5)  # below 16M: not judged
    met = {"rows": [small, _row("fp32", 1 << 24, 95.0, 4.0), _row("fp32", 1 << 28, 91.0, 3.5), _row("bf16+sr", 1 << 24, 92.0, None)]}
    summary = sweep.summarize_gpu(met)
    assert summary["by_mode"]["fp32"]["min_pct_of_copy"] == 91.0
    assert summary["by_mode"]["fp32"]["min_speedup_vs_foreach"] == 3.5
    assert all(summary["goals_met"].values()), summary
    missed = {"rows": met["rows"] + [_row("bf16+sr", 1 << 26, 89.0, None), _row("fp16", 1 << 24, 95.0, 2.9)]}
    assert not any(sweep.summarize_gpu(missed)["goals_met"].values())
    assert sweep.summarize_gpu({"rows": [small]})["goals_met"] is None


def test_a_failing_torch_compile_is_reported_once_and_the_row_kept(monkeypatch):
    calls = []

    def failing_compile(fn, **_):
        calls.append(fn)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(sweep, "_compiled_torch_step", None)
    monkeypatch.setattr(sweep, "_compiled_torch_error", None)
    mode = sweep.aot.DTYPE_MODES["fp32"]
    rows = [sweep._torch_baselines(mode, 1000, torch.device("cpu"), 1.0, compiled=True) for _ in range(2)]
    assert len(calls) == 1, "a failed compile is not tried again"
    assert all(row["torch_compiled_error"] == "RuntimeError: no compiler here" for row in rows)
    assert all(row["torch_foreach_ms"] > 0 and "torch_compiled_ms" not in row for row in rows)


def test_the_sweep_without_matplotlib_or_tqdm_writes_its_results_and_says_so(cpu_sweep, monkeypatch, tmp_path, capsys):
    # What a GPU machine without them runs: no plot, no progress bar, the same JSON.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sweep, "tqdm", sweep.NoProgress)
    args = ["--device", "cpu", "--log2", "12", "--modes", "fp32", "--no-compiled-torch", "--out", str(tmp_path)]
    assert sweep.main(args) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sweep_cpu_interpreter.json"]
    assert "plot skipped: matplotlib not installed" in capsys.readouterr().out
    record = json.loads((tmp_path / "sweep_cpu_interpreter.json").read_text())
    assert record["complete"] and [row["mode"] for row in record["rows"]] == ["fp32"]
    with sweep.NoProgress(total=3) as bar:
        bar.update()
    assert list(sweep.NoProgress([1, 2])) == [1, 2]


# ------------------------------------------------------------------ perf/ab_native.py
def _ab_native(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "perf" / "ab_native.py"), "--out", str(tmp_path), *args],
        env=environment, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_the_c_loop_a_b_times_both_versions_in_every_mode_asked(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: there is no native loop to compare")
    modes = ["fp32", "bf16, stochastic rounding", "fp32, 8-bit state"]
    base = REPO / "triton_adadelta" / "csrc" / "adadelta_cpu.c"
    run = _ab_native(tmp_path, "--base", str(base), "--modes", *modes, "--elements", "4096", "--rounds", "5", "--threads", "1",
                     "--grads", "fresh")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "ab_native.json").read_text())
    assert record["machine"]["torch"] == torch.__version__ and record["threads"] == 1
    assert record["grads"] == "fresh" and all(row["grads"] == "fresh" for row in record["results"])
    assert [row["mode"] for row in record["results"]] == modes
    for row in record["results"]:
        assert row["base_ms"] > 0 and row["new_ms"] > 0 and row["rounds"] == 5
        assert row["new_vs_base"] == pytest.approx(row["new_ms"] / row["base_ms"])
        assert row["mode"] in run.stdout


def test_the_c_loop_a_b_says_what_is_wrong_with_its_base(tmp_path):
    run = _ab_native(tmp_path, "--base", "no-such-revision", "--modes", "fp32", "--elements", "64")
    assert run.returncode != 0
    assert "neither a file nor a git revision" in run.stderr
    assert not (tmp_path / "ab_native.json").exists()


def test_bench_step_runs_on_the_threads_asked_and_records_them(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # (its import refuses the interpreter; nothing is timed here)
    import bench_step

    class Recorded(Exception):
        pass

    def record_threads(device):
        raise Recorded(torch.get_num_threads())

    threads = torch.get_num_threads()
    monkeypatch.setattr(bench_step, "machine_info", record_threads)
    try:
        with pytest.raises(Recorded) as recorded:
            bench_step.main(["--device", "cpu", "--threads", "1"])
        assert recorded.value.args == (1,)  # set before the machine (and its thread count) is recorded
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SystemExit):
        bench_step.main(["--device", "cpu", "--threads", "0"])
    assert torch.get_num_threads() == threads
