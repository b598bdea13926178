"""Two untuned launches per state mode at 16M elements, for Nsight Compute.

Run it under ``ncu`` on a CUDA machine, for example::

    ncu -k regex:adadelta --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python perf/ncu_state_modes.py > ncu_state_modes.txt

Each mode runs the default config (``TRITON_ADADELTA_AUTOTUNE=0``), so the profile
shows the kernel that an untuned step launches: fp32 params with fp32 state, bf16
params with 8-bit state, and fp32 params with bf16 state, in that order.
``perf/results/gpu/ncu_state_modes.txt`` is one such run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_ADADELTA_AUTOTUNE", "0")

import torch  # noqa: E402

from triton_adadelta.kernels.adadelta import QUANT_BLOCK  # noqa: E402
from triton_adadelta.update import step_flat_  # noqa: E402

N_ELEMENTS = 1 << 24
# name: (param dtype, state dtype)
MODES = {
    "fp32": (torch.float32, torch.float32),
    "bf16 + 8-bit state": (torch.bfloat16, torch.uint8),
    "fp32 + bf16 state": (torch.float32, torch.bfloat16),
}


def main() -> None:
    for name, (param_dtype, state_dtype) in MODES.items():
        param = torch.randn(N_ELEMENTS, device="cuda", dtype=param_dtype)
        grad = torch.randn_like(param)
        scales: dict[str, torch.Tensor | None] = {"square_avg_scale": None, "acc_delta_scale": None}
        if state_dtype == torch.uint8:
            square_avg = torch.randint(0, 256, (N_ELEMENTS,), device="cuda", dtype=torch.uint8)
            acc_delta = square_avg.clone()
            for key in scales:
                scales[key] = torch.full((N_ELEMENTS // QUANT_BLOCK,), 2.0**-4, device="cuda")
        else:
            square_avg = torch.rand(N_ELEMENTS, device="cuda", dtype=state_dtype)
            acc_delta = square_avg.clone()
        for _ in range(2):
            step_flat_(param, grad, square_avg, acc_delta, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, **scales)
        torch.cuda.synchronize()
        print(name, "ok", flush=True)


if __name__ == "__main__":
    main()
