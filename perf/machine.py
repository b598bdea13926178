"""What every perf results file records (the machine, the versions and the date), and how it is written.

Run as a script, it prints the record as one line of JSON (``perf/gpu_check.py``
reads it in a process of its own, so a broken GPU driver cannot stop the check)::

    python perf/machine.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
# The GPU math: its hash says which kernel a results file measured.
KERNEL_SOURCE = REPO / "kernels" / "adadelta.py"


def _command_output(command: list[str]) -> str | None:
    """The stripped stdout of ``command``, or None where it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def gpu_info(device: torch.device | None = None) -> dict[str, object]:
    """The GPU that ``device`` names (the current one by default): name, count, memory, driver."""
    index = device.index if device is not None and device.type == "cuda" and device.index is not None else None
    index = torch.cuda.current_device() if index is None else index
    properties = torch.cuda.get_device_properties(index)
    info: dict[str, object] = {
        "gpu": properties.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_capability": f"{properties.major}.{properties.minor}",
        "gpu_memory_GiB": round(properties.total_memory / 2**30, 1),
        "gpu_multiprocessors": properties.multi_processor_count,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
    }
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if driver:
        info["driver"] = driver.splitlines()[0]
    return info


def machine_info(device: torch.device | None = None) -> dict[str, object]:
    """The machine, versions and UTC date, for a results file."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:  # from the install's metadata: importing the package takes seconds
        info["triton_adadelta"] = importlib.metadata.version("triton-adadelta")
    except importlib.metadata.PackageNotFoundError:
        pass
    # A copy of the working tree (as on a lent GPU machine) may have no git history.
    commit = _command_output(["git", "rev-parse", "HEAD"])
    if commit:
        info["git_commit"] = commit
        # A copy's history can be older than its files (a lent GPU machine's was):
        # say whether tracked files differ from that commit, and which kernel ran.
        status = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
        if status is not None:
            info["git_tree_modified"] = bool(status)
    info["kernel_sha256"] = hashlib.sha256(KERNEL_SOURCE.read_bytes()).hexdigest()[:16]
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        info.update(gpu_info(device))
    return info


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` whole or not at all: a run cut short keeps the last complete file."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="the device the record is for (cuda, cuda:1, cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps(machine_info(None)))
        raise SystemExit(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none")
    print(json.dumps(machine_info(device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
