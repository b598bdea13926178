"""The wheel installs triton_adadelta and triton_adadelta.kernels, and no top-level
``kernels`` module (that name belongs to other PyPI packages)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_triton_adadelta_package(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("triton_adadelta-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"triton_adadelta"}, top_level
    shipped = (
        "triton_adadelta/kernels/__init__.py",
        "triton_adadelta/kernels/adadelta.py",
        "triton_adadelta/py.typed",
        "triton_adadelta/csrc/adadelta_cpu.c",  # the CPU path's native loop, compiled at first use
        "triton_adadelta/csrc/read_params.cpp",  # the step's param reader, compiled at first use
    )
    for module in shipped:
        assert module in names, module
    # The package never ships (or imports) perf/ or tests/.
    assert not any(name.startswith(("perf/", "tests/")) for name in names)


def test_package_imports_neither_perf_nor_tests():
    for path in list((REPO / "triton_adadelta").glob("*.py")) + list((REPO / "kernels").glob("*.py")):
        source = path.read_text()
        for forbidden in ("import perf", "from perf", "import tests", "from tests", "import oracle", "from oracle"):
            assert forbidden not in source, f"{path.name}: {forbidden}"
