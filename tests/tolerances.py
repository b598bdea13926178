"""The one tolerance table of the test suite. Each entry says why it is what it is.

Kernel and CPU-path results are compared with the fp64 oracle (tests/oracle.py)
by an error bound, not a fixed rtol: a step's stored value must lie within
``roundoff_units * unit_roundoff * magnitude`` of the exact result (then rounded
to the storage dtype), where ``magnitude`` is the oracle's running-error magnitude
of that output (floored at the smallest normal, which covers subnormal results).

FMA contraction: the Triton kernel is compiled with ``enable_fp_fusion=False``, so
each operation is rounded once, exactly as the interpreter (numpy) rounds it; a GPU
run and an interpreter run give the same bits. torch's CPU ops may use FMA (add
with alpha, addcmul), so kernel and torch may differ in the last bits of a step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    value: float
    reason: str


UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}

TOLERANCES = {
    "roundoff_units": Tolerance(
        8,
        "the longest chain from an input to an output (weight decay, square, scale, "
        "add, sqrt, div, mul, scale, add) rounds at most 6 times, each by at most half "
        "an ulp of the magnitude; hyper-parameters are rounded to fp32 once more",
    ),
    "torch_parity_cpu_fp32_torch_sqrt": Tolerance(
        0.0,
        "with TRITON_ADADELTA_CPU_SQRT=torch the CPU path's fused loop calls torch's own "
        "sqrt and fuses exactly where torch's CPU ops do, so it is bit-identical to "
        "torch.optim.Adadelta",
    ),
    "torch_parity_cpu_fp64_torch_sqrt": Tolerance(
        0.0,
        "the same for fp64: the fused loop calls torch's fp64 sqrt (MKL's vmdSqrt) and "
        "fuses where torch's CPU ops do, so it is bit-identical to torch.optim.Adadelta",
    ),
    "torch_parity_kernel_rtol": Tolerance(
        2e-5,
        "kernel (and the CPU path, by default) vs torch over a 50-step trajectory: each "
        "step may differ in the last bit (they use the correctly rounded sqrt, torch's "
        "CPU sqrt is MKL's, off by an ulp on ~20% of elements), and AdaDelta's sqrt "
        "ratio carries such differences forward; 2e-5 is about 170 fp32 ulps of "
        "relative drift over the whole run",
    ),
    "torch_parity_kernel_atol": Tolerance(
        1e-6,
        "the same drift for params that pass near zero, where a relative bound is "
        "meaningless: 1e-6 is about the size of one AdaDelta step at eps=1e-6",
    ),
    "torch_parity_fp32_to_fp64_rtol": Tolerance(
        1e-5,
        "a model moved from fp32 to fp64 mid-run: torch keeps its fp32 state and rounds "
        "every later state update to fp32, ours carries the state into fp64 state; over "
        "3 steps that is a few fp32 ulps of the state, carried into the params",
    ),
    "torch_parity_fp32_to_fp64_atol": Tolerance(
        1e-6,
        "the same for params that pass near zero: about one AdaDelta step at eps=1e-6",
    ),
    "accuracy_trajectory_p99_ulps": Tolerance(
        0.05,
        "after 100 steps a param's error is mostly the random walk of 100 fp32 stores "
        "of p (half an ulp each, sigma about 3 ulp), the same for any fp32 optimizer; "
        "the p99 over 20000 elements of two such walks differs by chance by up to "
        "0.015 ulp (measured over seeds 1-3)",
    ),
    "accuracy_trajectory_max_ulps": Tolerance(
        3.0,
        "the max over 20000 elements of those random walks is one tail draw: over "
        "seeds 1-3 ours and torch's differed by up to 2.1 ulp either way",
    ),
}


def parity_tolerance() -> dict[str, float]:
    """rtol/atol of parity with torch.optim.Adadelta, for either backend."""
    return {"rtol": TOLERANCES["torch_parity_kernel_rtol"].value, "atol": TOLERANCES["torch_parity_kernel_atol"].value}


def fp64_conversion_tolerance() -> dict[str, float]:
    """rtol/atol of parity with torch after a model moved from fp32 to fp64 mid-run."""
    return {
        "rtol": TOLERANCES["torch_parity_fp32_to_fp64_rtol"].value,
        "atol": TOLERANCES["torch_parity_fp32_to_fp64_atol"].value,
    }


def roundoff_units() -> float:
    return TOLERANCES["roundoff_units"].value
