"""Profile one launch per state mode at 16M elements with Nsight Compute, and read the profile.

On a CUDA machine, run the launches under ``ncu``::

    ncu -k regex:adadelta --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section LaunchStats --section Occupancy \\
        python perf/ncu_state_modes.py > ncu_state_modes.txt

Each mode runs twice with the default config (``TRITON_ADADELTA_AUTOTUNE=0``), so
the profile shows the kernel an untuned step launches: fp32 params with fp32 state,
bf16 params with 8-bit state, and fp32 params with bf16 state, in that order. Then,
anywhere::

    python perf/ncu_state_modes.py --summarize perf/results/gpu/ncu_state_modes.txt

prints, per kernel, the instructions executed per element (all warps' instructions
x 32 / elements) and the most that many instructions allow: the % of the copy
bandwidth the kernel could reach if the SMs issued an instruction every cycle at
their highest clock, against its floor bytes (``--sm-clock-ghz``, ``--copy-gbps``:
by default H200's 1.98 GHz boost clock and the copy bandwidth of
``perf/results/gpu/sweep_gpu.json``). ``perf/results/gpu/ncu_state_modes.txt`` is
one such profile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_ELEMENTS = 1 << 24
# The profiled modes, in launch order (names of triton_adadelta.kernels.aot.DTYPE_MODES).
MODES = ("fp32", "bf16+u8state", "fp32+bf16state")
LAUNCHES_PER_MODE = 2
# Warp instructions an SM can issue per cycle (four schedulers, one each).
ISSUE_PER_CYCLE = 4
WARP_SIZE = 32


def launch() -> None:
    """Two untuned steps of each mode on 16M elements (run this under ncu)."""
    os.environ.setdefault("TRITON_ADADELTA_AUTOTUNE", "0")
    import torch

    from triton_adadelta.kernels.adadelta import QUANT_BLOCK
    from triton_adadelta.kernels.aot import DTYPE_MODES, param_dtype
    from triton_adadelta.update import step_flat_

    state_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}
    for name in MODES:
        state_dtype = state_dtypes[DTYPE_MODES[name].state]
        param = torch.randn(N_ELEMENTS, device="cuda", dtype=param_dtype(name))
        grad = torch.randn_like(param)
        scales: dict[str, torch.Tensor | None] = {"square_avg_scale": None, "acc_delta_scale": None}
        if state_dtype == torch.uint8:
            square_avg = torch.randint(0, 256, (N_ELEMENTS,), device="cuda", dtype=torch.uint8)
            for key in scales:
                scales[key] = torch.full((N_ELEMENTS // QUANT_BLOCK,), 2.0**-4, device="cuda")
        else:
            square_avg = torch.rand(N_ELEMENTS, device="cuda", dtype=state_dtype)
        acc_delta = square_avg.clone()
        for _ in range(LAUNCHES_PER_MODE):
            step_flat_(param, grad, square_avg, acc_delta, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, **scales)
        torch.cuda.synchronize()
        print(name, "ok", flush=True)


def _metric(section: str, name: str) -> float:
    match = re.search(rf"^\s*{re.escape(name)}\s+\S+\s+([\d,.]+)\s*$", section, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {name!r} in a kernel's profile")
    return float(match.group(1).replace(",", ""))


def summarize(text: str, sm_clock_ghz: float, copy_gbps: float) -> list[dict[str, float | str]]:
    """One row per profiled kernel: instructions per element and the bound they set."""
    from triton_adadelta.kernels.aot import DTYPE_MODES

    kernels = re.split(r"^\s*adadelta_kernel \(", text, flags=re.MULTILINE)[1:]
    if len(kernels) != len(MODES) * LAUNCHES_PER_MODE:
        raise ValueError(f"{len(kernels)} kernels in the profile, not {len(MODES) * LAUNCHES_PER_MODE}")
    rows = []
    for index, kernel in enumerate(kernels):
        mode = MODES[index // LAUNCHES_PER_MODE]
        sms = _metric(kernel, "# SMs")
        warp_instructions = _metric(kernel, "Elapsed Cycles") * _metric(kernel, "Executed Ipc Elapsed") * sms
        per_element = warp_instructions * WARP_SIZE / N_ELEMENTS
        issue_bound_s = warp_instructions / (ISSUE_PER_CYCLE * sms) / (sm_clock_ghz * 1e9)
        floor_s = DTYPE_MODES[mode].floor_bytes * N_ELEMENTS / (copy_gbps * 1e9)
        rows.append({
            "mode": mode,
            "instructions_per_element": per_element,
            "registers": _metric(kernel, "Registers Per Thread"),
            "achieved_occupancy_pct": _metric(kernel, "Achieved Occupancy"),
            "issue_slots_busy_pct": _metric(kernel, "Issue Slots Busy"),
            "duration_us_under_ncu": _metric(kernel, "Duration"),
            "max_pct_of_copy": 100 * min(1.0, floor_s / issue_bound_s),
            # The instructions per element at which perfect issue takes floor / 0.9.
            "instructions_per_element_for_90pct": per_element * (floor_s / 0.9) / issue_bound_s,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarize", type=Path, help="read this ncu output instead of launching")
    parser.add_argument("--sm-clock-ghz", type=float, default=1.98, help="the SMs' highest clock (H200: 1.98)")
    parser.add_argument("--copy-gbps", type=float, default=None, help="default: sweep_gpu.json's copy bandwidth")
    args = parser.parse_args()
    if args.summarize is None:
        launch()
        return
    copy_gbps = args.copy_gbps
    if copy_gbps is None:
        copy_gbps = json.loads((REPO / "perf" / "results" / "gpu" / "sweep_gpu.json").read_text())["copy_bandwidth_GBps"]
    print(f"{'mode':<16} {'instr/elem':>10} {'regs':>5} {'occupancy':>9} {'issue busy':>10} {'us (ncu)':>9} {'max % of copy':>13} {'instr/elem for 90%':>18}")
    for row in summarize(args.summarize.read_text(), args.sm_clock_ghz, copy_gbps):
        print(f"{row['mode']:<16} {row['instructions_per_element']:>10.1f} {row['registers']:>5.0f} "
              f"{row['achieved_occupancy_pct']:>8.1f}% {row['issue_slots_busy_pct']:>9.1f}% "
              f"{row['duration_us_under_ncu']:>9.1f} {row['max_pct_of_copy']:>12.0f}% "
              f"{row['instructions_per_element_for_90pct']:>18.0f}")  # fmt: skip
    print(f"(max % of copy: an instruction issued every cycle on every scheduler at {args.sm_clock_ghz} GHz, "
          f"against the mode's floor bytes at {copy_gbps:.0f} GB/s)")


if __name__ == "__main__":
    main()
