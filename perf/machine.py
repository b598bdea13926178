"""What every perf results file records: the machine, the versions and the date."""

from __future__ import annotations

import datetime
import os
import platform

import torch
import triton


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
    try:
        import triton_adadelta

        info["triton_adadelta"] = triton_adadelta.__version__
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else None)
        info["cuda"] = torch.version.cuda
        info["hip"] = torch.version.hip
    return info
