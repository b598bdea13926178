"""One command that proves the kernel on a real GPU in a few minutes (issue 14).

::

    make gpu-check                                   # this script, --out perf/results/gpu
    python perf/gpu_check.py --out DIR               # within 8 minutes on one H100
    python perf/gpu_check.py --out DIR --quick       # about half of that
    python perf/gpu_check.py --out DIR --device cpu --tiny   # the plumbing, without a GPU

It uses the torch and triton it finds and installs nothing. Each stage runs in a
process of its own (in this one's process tree) with a time budget; a stage that
fails, crashes or runs out of time is recorded and the next one runs:

- ``machine``: the machine record (``perf/machine.py``): the GPU, its driver, the
  versions and the date;
- ``tests``: ``pytest -m gpu`` on the device (``tests/test_gpu.py``,
  ``tests/test_capturable.py``): every dtype mode against the fp64 oracle, every
  autotune config and the tuned choice, parity with torch, the compiled kernel's bits
  against the interpreter's, GradScaler's skip, CUDA-graph capture and replay, and
  two devices where there are two;
- ``sweep``: ``perf/sweep.py``: GB/s and the % of the measured copy bandwidth per
  size and dtype mode, the best config, torch's Adadelta (foreach, for-loop and
  ``torch.compile``'d) in the same run, the plot, and issue 14's goals;
- ``bench``: ``perf/bench_step.py --quick``: whole ``step()`` times, with the
  1000 × 100 and ``zero_grad()`` loop rows.

Into ``--out`` it writes ``summary.json`` and ``summary.md`` (rewritten after every
stage, so a run cut short keeps what it found), ``gpu_check.log`` (every stage's
output and any traceback), and the sweep's and the bench's JSON and PNG: at most 7
files, each well under 16 MB. The exit status is 0 when every stage passed or was
skipped for a missing optional package, else 1.

``--device cpu --tiny`` runs the same stages on tiny sizes, the kernel through
Triton's interpreter (each stage's ``TRITON_INTERPRET`` is set here, whatever the
caller's): its figures are no measurement, only the plumbing's proof
(``tests/test_gpu_check.py`` runs it in CI).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

REPO = Path(__file__).resolve().parents[1]
PERF = REPO / "perf"
# Every test file with tests marked `gpu` (tests/test_gpu_check.py checks the list is whole).
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_capturable.py")
# A stage's output kept in the log (and the lines kept to read its figures from).
LOG_BYTES_PER_STAGE = 4 << 20
KEPT_LINES = 5000
# After SIGINT (pytest then prints its summary, the perf scripts their last rows), how
# long a stage that ran out of time gets before SIGKILL.
STOP_GRACE_S = 15.0
# Kept free of the total budget for the summary.
SUMMARY_RESERVE_S = 5.0


@dataclass
class Profile:
    """How much each stage does, and its time budget in seconds."""

    name: str
    budgets: dict[str, float]
    hypothesis_profile: str
    tests_filter: str | None
    sweep_args: list[str]
    bench_args: list[str]
    xdist_workers: int


PROFILES = {
    # Fits 8 minutes on one H100 (each budget is a ceiling; the whole run is cut at
    # --budget-s): the sizes the goals are judged on (16M elements and up) first.
    "default": Profile(
        "default", {"machine": 60, "tests": 170, "sweep": 240, "bench": 90}, "ci", None,
        ["--log2", "28", "26", "24", "20", "16", "12"], ["--quick"], 4,
    ),
    "quick": Profile(
        "quick", {"machine": 60, "tests": 100, "sweep": 90, "bench": 50}, "smoke", None,
        ["--log2", "28", "24", "16"], ["--quick", "--budget-s", "3",
                                       "--shapes", "1000 x 100", "1000 x 100, zero_grad", "16M in 4"], 4,
    ),  # fmt: skip
    # CPU plumbing: tiny sizes, a few tests, no compiled baseline (minutes to compile on a CPU).
    "tiny": Profile(
        "tiny", {"machine": 60, "tests": 120, "sweep": 60, "bench": 60}, "smoke", "fp32 or grad_scale or meant_to or reference_bits",
        ["--log2", "12", "--modes", "fp32", "bf16+master", "--copy-mib", "16", "--no-compiled-torch"],
        ["--quick", "--budget-s", "0.2", "--no-build-timing", "--shapes", "1000 x 100", "1000 x 100, zero_grad"], 0,
    ),  # fmt: skip
}
DEFAULT_TOTAL_BUDGET_S = {"default": 480.0, "quick": 240.0, "tiny": 300.0}


@dataclass
class StageResult:
    """What one stage did: ``status`` is passed, failed, timeout, skipped or error (a fault here)."""

    name: str
    status: str
    returncode: int | None = None
    duration_s: float = 0.0
    budget_s: float = 0.0
    note: str = ""
    files: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One step of the check: a command, its budget, and how to judge what it did.

    Args:
        name: the stage's name in the summary.
        command: run in the repository's root.
        env: set for the command, over this process's environment.
        budget_s: seconds before it is stopped.
        outputs: the results files it writes into the output folder.
        judge: ``(result, output lines, output folder, outputs) -> None``; sets the
            status from the exit code, reads the figures, and fails a run that
            claims success without its results.
        needs: modules without which it cannot run (it is skipped).
        optional: modules whose absence it survives (noted in the summary).
    """

    name: str
    command: list[str]
    env: dict[str, str]
    budget_s: float
    outputs: list[str]
    judge: Callable[[StageResult, list[str], Path, list[str]], None]
    needs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken install counts as none
            missing.append(name)
    return missing


# ----------------------------------------------------------------- judges
def judge_exit(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> None:
    """Passed on exit code 0 with every results file written; else failed (a timeout stays one)."""
    absent = [name for name in outputs if not (out / name).is_file()]
    if result.status == "timeout":
        return
    if result.returncode != 0:
        result.status = "failed"
    elif absent:
        result.status = "failed"
        result.note = f"exit 0 but no {', '.join(absent)}"
    else:
        result.status = "passed"


def judge_machine(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> None:
    """The record is the JSON line machine.py prints (also when it then fails: no CUDA device)."""
    judge_exit(result, lines, out, outputs)
    records = [line for line in lines if line.startswith("{")]
    machine = json.loads(records[-1]) if records else {}
    result.figures["machine"] = machine
    if machine:
        gpu = f"{machine['gpu']} x{machine['gpu_count']}, driver {machine.get('driver', '?')}" if "gpu" in machine else "no GPU"
        result.note = f"{gpu}; torch {machine['torch']}, triton {machine['triton']}"
    elif result.status == "passed":
        result.status = "failed"
    if result.status != "passed":
        result.note = "; ".join(filter(None, [result.note, lines[-1].strip() if lines else "no output"]))


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")
_PYTEST_FINAL = re.compile(r" in \d+(\.\d+)?s")


def judge_tests(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> None:
    """Counts from pytest's last line, failures and skips from its short summary (-rfEs)."""
    judge_exit(result, lines, out, outputs)
    finals = [line for line in lines if _PYTEST_FINAL.search(line) and _PYTEST_COUNT.search(line)]
    counts = {kind: int(n) for n, kind in _PYTEST_COUNT.findall(finals[-1])} if finals else {}
    counts = {("errors" if kind == "error" else "warnings" if kind == "warning" else kind): n for kind, n in counts.items()}
    result.figures = {
        "counts": counts,
        "failed": [line.strip() for line in lines if line.startswith(("FAILED ", "ERROR "))][:50],
        "skipped": [line.strip() for line in lines if line.startswith("SKIPPED ")][:50],
    }
    result.note = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "warnings") or "no pytest summary"
    if result.status == "passed" and not counts.get("passed"):
        # All skipped (the device not seen, say) proves nothing.
        result.status = "failed"
        result.note += "; no test ran"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def judge_results_file(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> dict[str, Any] | None:
    """Judge by exit code and results files; the JSON (even from a run cut short), if any."""
    judge_exit(result, lines, out, outputs)
    record = _read_json(out / outputs[0])
    if record is not None and not record.get("complete", True) and result.status == "passed":
        result.status = "failed"
        result.note = "its results file is incomplete"
    skipped_plots = [line.strip() for line in lines if line.startswith("plot skipped")]
    if skipped_plots:
        result.note = "; ".join(filter(None, [result.note, *skipped_plots]))
    return record


def judge_sweep(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> None:
    record = judge_results_file(result, lines, out, outputs)
    if record is None:
        return
    summary = record.get("summary", {})
    result.figures = {
        "copy_bandwidth_GBps": record.get("copy_bandwidth_GBps"),
        "rows": len(record.get("rows", [])),
        "sizes": record.get("sizes"),
        "best_config_per_bucket": record.get("best_config_per_bucket"),
        "large_buffers": summary.get("by_mode", {}),
        "goals_met": summary.get("goals_met"),
        "compile_errors": sorted({row["torch_compiled_error"] for row in record.get("rows", []) if "torch_compiled_error" in row}),
    }
    parts = [f"{len(record.get('rows', []))} rows", f"copy {record.get('copy_bandwidth_GBps', 0):.0f} GB/s"]
    if summary.get("goals_met"):
        parts.append("goals: " + ", ".join(f"{goal} {'met' if met else 'MISSED'}" for goal, met in summary["goals_met"].items()))
    if result.figures["compile_errors"]:
        parts.append("torch.compile failed")
    result.note = "; ".join(filter(None, [*parts, result.note]))


def judge_bench(result: StageResult, lines: list[str], out: Path, outputs: list[str]) -> None:
    record = judge_results_file(result, lines, out, outputs)
    if record is None:
        return
    rows = [
        {
            "shape": row["shape"],
            "ours_ms": row["timings_ms"]["triton_adadelta"]["median"],
            "foreach_ms": row["timings_ms"]["torch foreach"]["median"],
            "forloop_ms": row["timings_ms"]["torch for-loop"]["median"],
            "speedup_vs_torch_best": row["speedup_vs_torch_best"],
            "ours_x_floor": row["ours_x_floor"],
            "backends": row["backends"],
        }
        for row in record.get("results", [])
    ]
    result.figures = {"rows": rows}
    shown = "; ".join(f"{row['shape']}: {row['speedup_vs_torch_best']:.1f}x" for row in rows)
    result.note = "; ".join(filter(None, [shown, result.note]))


# ----------------------------------------------------------------- stages
def build_stages(device: str, profile: Profile, out: Path, from_source: bool = False) -> list[Stage]:
    """The four stages for ``device`` (``cuda`` or ``cpu``) at ``profile``'s sizes.

    ``from_source``: the package comes from ``source_tree_path()``, which the
    checkout's own ``triton_adadelta/`` must not shadow (``python -m`` puts the
    working folder first on the path; ``PYTHONSAFEPATH`` keeps it off, Python 3.11+).
    """
    python = sys.executable
    on_gpu = device != "cpu"
    interpret = "0" if on_gpu else "1"  # the interpreter only for the CPU plumbing
    tests = [python, "-m", "pytest", "-m", "gpu", *GPU_TEST_FILES, "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=15"]
    if profile.tests_filter:
        tests += ["-k", profile.tests_filter]
    if on_gpu and profile.xdist_workers and not missing_modules(("xdist",)):
        # Compiling the kernel's variants dominates: four processes compile in parallel.
        tests += ["-n", str(profile.xdist_workers)]
    sweep_stem = "sweep_gpu" if on_gpu else "sweep_cpu_interpreter"
    bench_stem = f"bench_step_{'cuda' if on_gpu else 'cpu'}"
    sweep_outputs = [f"{sweep_stem}.json", f"{sweep_stem}.png"]
    bench_outputs = [f"{bench_stem}.json", f"{bench_stem}.png"]
    # Without matplotlib the PNGs are not written and not expected.
    if missing_modules(("matplotlib",)):
        sweep_outputs, bench_outputs = sweep_outputs[:1], bench_outputs[:1]
    return [
        Stage("machine", [python, str(PERF / "machine.py"), "--device", device], {"TRITON_INTERPRET": "0"},
              profile.budgets["machine"], [], judge_machine),  # fmt: skip
        Stage(
            "tests", tests,
            {"TRITON_INTERPRET": interpret, "TRITON_ADADELTA_TEST_DEVICE": device, "HYPOTHESIS_PROFILE": profile.hypothesis_profile,
             **({"PYTHONSAFEPATH": "1"} if from_source else {})},
            profile.budgets["tests"], [], judge_tests, needs=("pytest",), optional=("hypothesis", "numpy"),
        ),  # fmt: skip
        Stage(
            "sweep", [python, str(PERF / "sweep.py"), "--device", device, "--out", str(out), *profile.sweep_args],
            {"TRITON_INTERPRET": interpret}, profile.budgets["sweep"], sweep_outputs, judge_sweep, optional=("matplotlib",),
        ),  # fmt: skip
        Stage(
            "bench", [python, str(PERF / "bench_step.py"), "--device", device, "--out", str(out), *profile.bench_args],
            {"TRITON_INTERPRET": "0"}, profile.budgets["bench"], bench_outputs, judge_bench, optional=("matplotlib",),
        ),  # fmt: skip
    ]


def source_tree_path() -> Path | None:
    """A folder to put first on the stages' ``PYTHONPATH`` where this checkout is not installed.

    pyproject maps ``kernels/`` to ``triton_adadelta.kernels``, so a bare checkout is
    not importable as it is: the folder holds ``triton_adadelta`` as links to the
    package's files with ``kernels`` among them. None where an install of this
    checkout (``pip install --no-deps -e .``) is found.
    """
    spec = importlib.util.find_spec("triton_adadelta")
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO):
        return None
    shim = Path(tempfile.mkdtemp(prefix="triton_adadelta_source_"))
    package = shim / "triton_adadelta"
    package.mkdir()
    for entry in (REPO / "triton_adadelta").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(REPO / "kernels")
    return shim


# ---------------------------------------------------------------- running
class StageLog:
    """``gpu_check.log``: each stage's output under a header, at most ``LOG_BYTES_PER_STAGE`` of it."""

    def __init__(self, path: Path) -> None:
        self.file: TextIO = path.open("w", buffering=1, errors="replace")
        self.stage_bytes = 0

    def header(self, text: str) -> None:
        self.stage_bytes = 0
        self.file.write(f"\n===== {text}\n")

    def output(self, line: str) -> None:
        if self.stage_bytes < LOG_BYTES_PER_STAGE:
            self.file.write(line)
            self.stage_bytes += len(line)
            if self.stage_bytes >= LOG_BYTES_PER_STAGE:
                self.file.write("[... the rest of this stage's output is left out ...]\n")

    def note(self, text: str) -> None:
        self.file.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        self.file.close()


def _heed_sigint() -> None:
    """In a stage's process, before it starts: SIGINT does what it does by default.
    A background job of a non-interactive shell (a CI runner's, `cmd &`) starts with
    SIGINT ignored, which its children inherit; then Python installs no
    KeyboardInterrupt, and a stage past its budget would wait out the grace."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process_group(process: subprocess.Popen[str]) -> None:
    """SIGINT to the stage's process group (pytest prints its summary), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(command: list[str], env: dict[str, str], timeout_s: float, log: StageLog, echo: bool) -> tuple[int | None, bool, list[str]]:
    """Run ``command`` in a process group of its own, its output teed to the log (and stdout).

    Returns:
        The exit code, whether it ran out of time, and its last ``KEPT_LINES`` lines.
    """
    # Its own group, in this session: a stage that runs out of time is stopped with
    # every process it started, and nothing outlives this process's session.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace", bufsize=1, preexec_fn=_heed_sigint, **group,
    )  # fmt: skip
    lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            log.output(line)
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process_group(process)
    except BaseException:
        stop_process_group(process)
        raise
    reader.join(timeout=10)
    return process.returncode, timed_out, list(lines)


def run_stage(stage: Stage, out: Path, log: StageLog, time_left_s: float, base_env: dict[str, str], echo: bool = True) -> StageResult:
    """Run one stage within ``min(its budget, time_left_s)``; never raises but on an interrupt."""
    budget = max(0.0, min(stage.budget_s, time_left_s))
    result = StageResult(stage.name, "skipped", budget_s=round(budget, 1))
    missing = missing_modules(stage.needs)
    absent_optional = missing_modules(stage.optional)
    log.header(f"{stage.name}: {shlex.join(stage.command)}  (budget {budget:.0f} s)")
    if missing:
        result.note = f"skipped: {', '.join(missing)} not installed"
    elif budget < 1.0:
        result.note = "skipped: out of time"
    if result.note:
        log.note(result.note)
        return result
    # Results of an earlier run in this folder must not pass for this run's.
    for name in stage.outputs:
        for path in (out / name, (out / name).with_suffix(".json.partial")):
            path.unlink(missing_ok=True)
    start = time.monotonic()
    try:
        returncode, timed_out, lines = run_command(stage.command, {**base_env, **stage.env}, budget, log, echo)
        result.returncode = returncode
        result.status = "timeout" if timed_out else "ran"
        result.duration_s = round(time.monotonic() - start, 1)
        stage.judge(result, lines, out, stage.outputs)
        if timed_out:
            result.note = "; ".join(filter(None, [f"stopped after its budget of {budget:.0f} s", result.note]))
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - a fault in this script is one stage's error, not the run's end
        result.status = "error"
        result.duration_s = round(time.monotonic() - start, 1)
        result.note = traceback.format_exc().strip().splitlines()[-1]
        log.note(traceback.format_exc())
    unmentioned = [name for name in absent_optional if name not in result.note]
    if unmentioned:
        result.note = "; ".join(filter(None, [result.note, f"{', '.join(unmentioned)} not installed"]))
    result.files = [name for name in stage.outputs if (out / name).is_file()]
    log.note(f"----- {stage.name}: {result.status} (exit {result.returncode}) in {result.duration_s} s; {result.note}")
    return result


# ---------------------------------------------------------------- summary
FAILING = ("failed", "timeout", "error", "interrupted")


def machine_record(results: list[StageResult]) -> dict[str, Any]:
    return next((r.figures.get("machine", {}) for r in results if r.name == "machine"), {})


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown: the stages, then what each found."""
    machine = summary["machine"]
    title = f"{machine.get('gpu', 'no GPU')}, torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}"
    lines = [f"# GPU check on {title}", "",
             f"{summary['started']}, device {summary['device']}, profile {summary['profile']}: "
             f"{'all stages passed' if summary['ok'] else 'NOT all stages passed'} in {summary['duration_s']:.0f} s", "",
             "| stage | status | exit | seconds | budget | note |", "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in summary["stages"]:
        note = stage["note"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {stage['name']} | {stage['status']} | {stage['returncode']} | {stage['duration_s']} | {stage['budget_s']:.0f} | {note} |")
    stages = {stage["name"]: stage for stage in summary["stages"]}
    tests = stages.get("tests", {}).get("figures", {})
    for title, key in (("Failed tests", "failed"), ("Skipped tests", "skipped")):
        if tests.get(key):
            lines += ["", f"## {title}", ""] + [f"- {line}" for line in tests[key]]
    sweep = stages.get("sweep", {}).get("figures", {})
    if sweep.get("large_buffers"):
        lines += ["", f"## Sweep: buffers of 16M elements and more (the worst over sizes), copy {sweep['copy_bandwidth_GBps']:.0f} GB/s", "",
                  "| mode | % of copy | GB/s | vs foreach | vs for-loop | vs compiled |", "|---|---|---|---|---|---|"]  # fmt: skip

        def cell(figures: dict[str, Any], key: str, unit: str) -> str:
            return f"{figures[key]:.1f}{unit}" if key in figures else "-"

        for mode, figures in sweep["large_buffers"].items():
            lines.append(f"| {mode} | {cell(figures, 'min_pct_of_copy', '%')} | {cell(figures, 'min_GBps', '')} | "
                         f"{cell(figures, 'min_speedup_vs_foreach', 'x')} | {cell(figures, 'min_speedup_vs_forloop', 'x')} | "
                         f"{cell(figures, 'min_speedup_vs_compiled', 'x')} |")  # fmt: skip
        if sweep.get("goals_met"):
            lines += ["", "Goals: " + ", ".join(f"{goal}: {'met' if met else 'MISSED'}" for goal, met in sweep["goals_met"].items())]
    bench = stages.get("bench", {}).get("figures", {})
    if bench.get("rows"):
        lines += ["", "## Whole step(), fp32 (bench_step, medians)", "",
                  "| shape | ours ms | foreach ms | for-loop ms | speed-up | ours / floor |", "|---|---|---|---|---|---|"]  # fmt: skip
        for row in bench["rows"]:
            lines.append(f"| {row['shape']} | {row['ours_ms']:.3f} | {row['foreach_ms']:.3f} | {row['forloop_ms']:.3f} | "
                         f"{row['speedup_vs_torch_best']:.1f}x | {row['ours_x_floor']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any]) -> str:
    """summary.json and summary.md, each written whole (a run cut short keeps the last)."""
    text = format_summary(summary)
    for name, content in (("summary.json", json.dumps(summary, indent=2)), ("summary.md", text)):
        partial = out / f"{name}.partial"
        partial.write_text(content)
        partial.replace(out / name)
    return text


def run_check(stages: list[Stage], out: Path, device: str, profile: str, total_budget_s: float,
              base_env: dict[str, str] | None = None, echo: bool = True) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """Run ``stages`` in order within ``total_budget_s``; write the summary after each.

    Returns:
        The exit status (0 when no stage failed, timed out or erred) and the summary.
    """
    out.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if base_env is None else base_env, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    started = time.monotonic()
    summary: dict[str, Any] = {
        "command": sys.argv,
        "device": device,
        "profile": profile,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_budget_s": total_budget_s,
        "machine": {},
        "stages": [],
        "ok": False,
        "duration_s": 0.0,
    }
    results: list[StageResult] = []
    log = StageLog(out / "gpu_check.log")
    interrupted = False

    def record() -> None:
        summary["stages"] = [asdict(result) for result in results]
        summary["machine"] = machine_record(results)
        summary["ok"] = bool(results) and not any(result.status in FAILING for result in results)
        summary["duration_s"] = round(time.monotonic() - started, 1)
        write_summary(out, summary)

    try:
        for stage in stages:
            if device != "cpu" and results and results[0].name == "machine" and results[0].status != "passed":
                # Without a GPU seen, the GPU stages would only fail after their budgets.
                results.append(StageResult(stage.name, "skipped", note="skipped: the machine stage found no usable GPU"))
                record()
                continue
            time_left = total_budget_s - (time.monotonic() - started) - SUMMARY_RESERVE_S
            results.append(run_stage(stage, out, log, time_left, base_env, echo))
            record()
    except KeyboardInterrupt:
        interrupted = True
        results.append(StageResult("interrupted", "interrupted", note="the check was interrupted (SIGINT or SIGTERM)"))
    finally:
        record()
        log.close()
    return (130 if interrupted else 0 if summary["ok"] else 1), summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results" / "gpu", help="the results folder")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the plumbing through the interpreter")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="fewer sizes, examples and rounds (about 4 minutes)")
    sizes.add_argument("--tiny", action="store_true", help="tiny sizes and a few tests: the plumbing (with --device cpu)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's time budget (default: 480, quick 240, tiny 300)")
    parser.add_argument("--stages", nargs="*", choices=["tests", "sweep", "bench"], default=None,
                        help="run only these (the machine record always runs)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu goes with --tiny: the interpreter takes hours over the GPU sizes")

    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "default"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shim = source_tree_path()
    stages = build_stages(args.device, profile, out, from_source=shim is not None)
    if args.stages is not None:
        stages = [stage for stage in stages if stage.name == "machine" or stage.name in args.stages]
    base_env = dict(os.environ)
    if shim is not None:
        print(f"triton_adadelta is not installed from {REPO}: running it from the source tree ({shim})", flush=True)
        base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), base_env.get("PYTHONPATH")]))
    # A SIGTERM (a machine's time limit, say) ends the run as Ctrl-C does: with a summary.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    total = args.budget_s if args.budget_s is not None else DEFAULT_TOTAL_BUDGET_S[profile.name]
    try:
        status, summary = run_check(stages, out, args.device, profile.name, total, base_env)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if shim is not None:
            shutil.rmtree(shim, ignore_errors=True)
    print("\n" + format_summary(summary), flush=True)
    print(f"results in {out}: {', '.join(sorted(path.name for path in out.iterdir() if path.is_file()))}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
