"""The GPU check's plumbing (perf/gpu_check.py), run on the CPU.

One real run, ``--device cpu --tiny``, goes through every stage as a GPU run does
(the machine record, ``pytest -m gpu`` on the CPU through the interpreter, the
sweep, the step benchmark) and must pass each, write every results file with the
machine record, and say so in the summary. Stages of a few lines then show that a
failing, crashing, hanging or unrunnable stage is reported as such, that the next
stage still runs, and that the exit status says it.
"""

from __future__ import annotations

import json
import signal
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "perf"))

import gpu_check  # noqa: E402

STAGES = ["machine", "tests", "sweep", "bench"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    run = subprocess.run(
        [sys.executable, str(REPO / "perf" / "gpu_check.py"), "--out", str(out), "--device", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return run, out, summary


def test_the_tiny_run_passes_every_stage_and_says_so(tiny_run):
    run, out, summary = tiny_run
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == STAGES, run.stdout[-3000:]
    failed = {name: (stage["status"], stage["note"]) for name, stage in stages.items() if stage["status"] != "passed"}
    assert not failed, (failed, (out / "gpu_check.log").read_text()[-5000:])
    assert run.returncode == 0 and summary["ok"]
    assert all(stage["returncode"] == 0 and stage["duration_s"] > 0 for stage in stages.values())
    # The printed summary table, the same as summary.md.
    markdown = (out / "summary.md").read_text()
    assert markdown in run.stdout
    for name in STAGES:
        assert re.search(rf"^\| {name} \| passed \| 0 \|", markdown, re.MULTILINE), markdown


def test_the_results_files_hold_the_machine_record(tiny_run):
    _, out, summary = tiny_run
    files = sorted(path.name for path in out.iterdir())
    expected = ["bench_step_cpu.json", "bench_step_cpu.png", "gpu_check.log", "summary.json", "summary.md",
                "sweep_cpu_interpreter.json", "sweep_cpu_interpreter.png"]  # fmt: skip
    assert files == expected
    # What a lent GPU machine sends back: at most 8 files of at most 16 MB.
    assert all((out / name).stat().st_size < 16 << 20 for name in files)
    machine = summary["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["triton"] and machine["date"]
    sweep = json.loads((out / "sweep_cpu_interpreter.json").read_text())
    assert sweep["complete"] and sweep["interpreter_dry_run"] and sweep["machine"]["torch"] == machine["torch"]
    assert {row["mode"] for row in sweep["rows"]} == {"fp32", "bf16+master"}
    assert set(sweep["best_config_per_bucket"]) == {"fp32", "bf16+master"}
    assert all(row["GBps"] > 0 and row["config_ms"] for row in sweep["rows"])
    bench = json.loads((out / "bench_step_cpu.json").read_text())
    assert bench["complete"] and bench["machine"]["device"] == "cpu"
    assert [row["shape"] for row in bench["results"]] == ["1000 x 100", "1000 x 100, zero_grad"]
    bench_figures = next(stage for stage in summary["stages"] if stage["name"] == "bench")["figures"]
    assert [row["shape"] for row in bench_figures["rows"]] == ["1000 x 100", "1000 x 100, zero_grad"]


def test_the_tests_stage_ran_the_gpu_tests_on_the_cpu(tiny_run):
    _, out, summary = tiny_run
    tests = next(stage for stage in summary["stages"] if stage["name"] == "tests")
    counts = tests["figures"]["counts"]
    assert counts.get("passed", 0) >= 5 and not counts.get("failed") and not counts.get("errors"), tests
    # What needs CUDA itself is skipped, and listed.
    assert any("CUDA" in line for line in tests["figures"]["skipped"]), tests
    log = (out / "gpu_check.log").read_text()
    assert "test_the_device_runs_the_kernel_it_is_meant_to" not in tests["note"]
    assert "===== tests: " in log and "-m gpu" in log


# ------------------------------------------------------------- stages of a few lines
def _stage(name: str, code: str, budget_s: float = 30.0, **options) -> gpu_check.Stage:
    """A stage that runs ``code`` in a fresh Python, judged by its exit code."""
    return gpu_check.Stage(name, [sys.executable, "-c", code], {}, budget_s, [], gpu_check.judge_exit, **options)


def _raise(*_) -> None:
    raise RuntimeError("a fault in a judge")


def test_failing_crashing_hanging_and_unrunnable_stages_are_reported_and_the_rest_runs(tmp_path):
    stages = [
        _stage("fails", "print('boom'); raise SystemExit(3)"),
        _stage("hangs", "import time; print('waiting', flush=True); time.sleep(120)", budget_s=1.0),
        gpu_check.Stage("errs", [sys.executable, "-c", "pass"], {}, 30.0, [], _raise),
        _stage("unrunnable", "pass", needs=("no_such_module_for_the_check",)),
        _stage("claims", "pass"),
        _stage("passes", "print('fine')", optional=("no_such_optional_module",)),
    ]
    stages[4].outputs = ["never_written.json"]
    status, summary = gpu_check.run_check(stages, tmp_path, "cpu", "tiny", 120.0, echo=False)
    results = {stage["name"]: stage for stage in summary["stages"]}
    assert {name: stage["status"] for name, stage in results.items()} == {
        "fails": "failed", "hangs": "timeout", "errs": "error", "unrunnable": "skipped", "claims": "failed", "passes": "passed",
    }  # fmt: skip
    assert status == 1 and not summary["ok"]
    assert results["fails"]["returncode"] == 3
    assert results["hangs"]["duration_s"] < 15, "stopped at its budget, not at its end"
    assert "stopped after its budget" in results["hangs"]["note"]
    assert "RuntimeError: a fault in a judge" in results["errs"]["note"]
    assert results["unrunnable"]["note"] == "skipped: no_such_module_for_the_check not installed"
    assert "no never_written.json" in results["claims"]["note"]
    assert "no_such_optional_module not installed" in results["passes"]["note"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom" in log and "waiting" in log and "fine" in log and "Traceback" in log
    # The files say the same as the return value.
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == summary["stages"]
    assert "| fails | failed | 3 |" in (tmp_path / "summary.md").read_text()


def test_a_run_out_of_time_skips_the_stages_left(tmp_path):
    stages = [_stage("first", "import time; time.sleep(30)", budget_s=30.0), _stage("second", "pass")]
    status, summary = gpu_check.run_check(stages, tmp_path, "cpu", "tiny", 7.0, echo=False)
    assert [stage["status"] for stage in summary["stages"]] == ["timeout", "skipped"]
    assert summary["stages"][1]["note"] == "skipped: out of time"
    assert status == 1


def test_main_exits_nonzero_when_a_stage_fails(tmp_path, monkeypatch, capsys):
    stages = [_stage("machine", "print('{\"torch\": \"t\", \"triton\": \"r\"}')"), _stage("tests", "raise SystemExit(1)")]
    stages[0].judge = gpu_check.judge_machine
    monkeypatch.setattr(gpu_check, "build_stages", lambda *_, **__: stages)
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [stage["status"] for stage in summary["stages"]] == ["passed", "failed"]
    assert summary["machine"] == {"torch": "t", "triton": "r"}
    assert "| tests | failed | 1 |" in capsys.readouterr().out


def test_without_a_usable_gpu_the_gpu_stages_are_skipped(tmp_path):
    stages = [_stage("machine", "raise SystemExit('no CUDA device')"), _stage("tests", "pass")]
    stages[0].judge = gpu_check.judge_machine
    status, summary = gpu_check.run_check(stages, tmp_path, "cuda", "default", 60.0, echo=False)
    assert [stage["status"] for stage in summary["stages"]] == ["failed", "skipped"]
    assert "no CUDA device" in summary["stages"][0]["note"]
    assert status == 1


# ------------------------------------------------------------------ the judges
def test_the_tests_judge_reads_pytest_s_summary():
    lines = ["FAILED tests/test_gpu.py::test_x[fp32] - AssertionError: 3 of 10 elements differ\n",
             "SKIPPED [1] tests/test_gpu.py:9: needs two CUDA devices\n",
             "3 passed, 1 failed, 2 skipped, 4 deselected in 1.23s\n"]  # fmt: skip
    result = gpu_check.StageResult("tests", "ran", returncode=1)
    gpu_check.judge_tests(result, lines, Path("."), [])
    assert result.status == "failed"
    assert result.figures["counts"] == {"passed": 3, "failed": 1, "skipped": 2, "deselected": 4}
    assert result.figures["failed"] == [lines[0].strip()] and result.figures["skipped"] == [lines[1].strip()]
    # Exit code 0 with nothing run (the device not seen) proves nothing.
    skipped_only = gpu_check.StageResult("tests", "ran", returncode=0)
    gpu_check.judge_tests(skipped_only, ["7 skipped in 0.50s\n"], Path("."), [])
    assert skipped_only.status == "failed" and "no test ran" in skipped_only.note


def test_every_file_with_gpu_tests_is_in_the_check():
    marked = {f"tests/{path.name}" for path in (REPO / "tests").glob("test_*.py") if re.search(r"^@gpu", path.read_text(), re.MULTILINE)}
    assert marked and marked <= set(gpu_check.GPU_TEST_FILES), marked


def test_the_source_tree_fallback_maps_kernels_into_the_package(monkeypatch):
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    shim = gpu_check.source_tree_path()
    try:
        package = shim / "triton_adadelta"
        assert (package / "__init__.py").resolve() == REPO / "triton_adadelta" / "__init__.py"
        assert (package / "kernels" / "adadelta.py").resolve() == REPO / "kernels" / "adadelta.py"
    finally:
        gpu_check.shutil.rmtree(shim)


def test_the_package_never_imports_the_perf_scripts():
    perf_modules = "|".join(path.stem for path in (REPO / "perf").glob("*.py"))
    pattern = re.compile(rf"^\s*(from|import)\s+(perf\b|({perf_modules})\b)", re.MULTILINE)
    for path in [*(REPO / "triton_adadelta").glob("*.py"), *(REPO / "kernels").glob("*.py")]:
        assert not pattern.search(path.read_text()), path


def test_without_matplotlib_no_plot_is_expected_and_without_xdist_tests_run_in_one_process(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "missing_modules", lambda names: [name for name in names if name in ("matplotlib", "xdist")])
    stages = {stage.name: stage for stage in gpu_check.build_stages("cuda", gpu_check.PROFILES["default"], tmp_path)}
    assert stages["sweep"].outputs == ["sweep_gpu.json"] and stages["bench"].outputs == ["bench_step_cuda.json"]
    assert "-n" not in stages["tests"].command
    # Where pytest-xdist is there, a GPU run compiles the kernel's variants in four processes.
    monkeypatch.setattr(gpu_check, "missing_modules", lambda names: [])
    stages = {stage.name: stage for stage in gpu_check.build_stages("cuda", gpu_check.PROFILES["default"], tmp_path)}
    assert stages["tests"].command[-2:] == ["-n", "4"]
    assert stages["tests"].env["TRITON_INTERPRET"] == "0" and stages["sweep"].env["TRITON_INTERPRET"] == "0"
    # Run from the source tree, pytest must not find the checkout's bare triton_adadelta/ first.
    assert "PYTHONSAFEPATH" not in stages["tests"].env
    from_source = gpu_check.build_stages("cuda", gpu_check.PROFILES["default"], tmp_path, from_source=True)
    assert from_source[1].name == "tests" and from_source[1].env["PYTHONSAFEPATH"] == "1"


def test_a_stage_past_its_budget_stops_at_once_where_sigint_is_ignored(tmp_path):
    # A background job of a non-interactive shell (CI runners, `cmd &`) starts with
    # SIGINT ignored, and its children inherit that: the stage must still heed it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stage = _stage("hangs", "import time; print('waiting', flush=True); time.sleep(120)", budget_s=1.0)
        _, summary = gpu_check.run_check([stage], tmp_path, "cpu", "tiny", 60.0, echo=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    (result,) = summary["stages"]
    assert result["status"] == "timeout"
    assert result["duration_s"] < gpu_check.STOP_GRACE_S, "it waited out the grace: SIGINT was ignored"
