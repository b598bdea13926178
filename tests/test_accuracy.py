"""The kernel is at least as accurate as torch.optim.Adadelta against the fp64 oracle.

Errors are in fp32 ulps. After one step they are taken at the exact value. After
100 steps they are taken at the largest magnitude the element reached along the
oracle's trajectory: that is the scale at which fp32 made its roundings, and an
element passing near zero would otherwise show a huge error in ulps of a tiny value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from tolerances import TOLERANCES
from triton_adadelta import Adadelta

HYPER = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 1e-2}
SIZE = 20_000
KEYS = ("param", "square_avg", "acc_delta")


def ulp_errors(steps: int, seed: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """Run ours, torch's and the oracle from the same start on the same grads."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(SIZE, generator=generator)
    grads = [
        torch.randn(SIZE, generator=generator) * 10.0 ** torch.empty(SIZE).uniform_(-3, 3, generator=generator)
        for _ in range(steps)
    ]
    results = {}
    for name, make in (("ours", Adadelta), ("torch", torch.optim.Adadelta)):
        param = torch.nn.Parameter(start.clone())
        optimizer = make([param], **HYPER)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        state = optimizer.state[param]
        results[name] = {"param": param.detach(), "square_avg": state["square_avg"], "acc_delta": state["acc_delta"]}

    p, v, u = start.double().numpy(), np.zeros(SIZE), np.zeros(SIZE)
    scale = {"param": np.abs(p), "square_avg": v, "acc_delta": u}
    for grad in grads:
        exact = oracle.adadelta_step(p, grad.double().numpy(), v, u, **HYPER)
        p, v, u = exact.param, exact.square_avg, exact.acc_delta
        for key, value in zip(KEYS, (p, v, u)):
            scale[key] = np.maximum(scale[key], np.abs(value)) if steps > 1 else np.abs(value)
    exact = dict(zip(KEYS, (p, v, u)))
    return {
        name: {key: np.abs(result[key].double().numpy() - exact[key]) / oracle.ulp(scale[key], "float32") for key in KEYS}
        for name, result in results.items()
    }


@pytest.mark.parametrize("steps", [1, 100])
def test_kernel_at_least_as_accurate_as_torch(steps):
    errors = ulp_errors(steps)
    slack = {
        "max": TOLERANCES["accuracy_trajectory_max_ulps"].value if steps > 1 else 0.0,
        "p99": TOLERANCES["accuracy_trajectory_p99_ulps"].value if steps > 1 else 0.0,
    }
    report = []
    failures = []
    for key in KEYS:
        ours, theirs = errors["ours"][key], errors["torch"][key]
        for stat, reduce in (("max", np.max), ("p99", lambda e: np.percentile(e, 99))):
            ours_value, torch_value = float(reduce(ours)), float(reduce(theirs))
            report.append(f"{steps} steps, {key} {stat}: ours {ours_value:.3f} ulp, torch {torch_value:.3f} ulp")
            if ours_value > torch_value + slack[stat]:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "\n".join(failures)
