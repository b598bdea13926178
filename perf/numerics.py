"""The numerics figures of README: accuracy against the fp64 oracle, and the bf16 regression.

1. Error in fp32 ulps against the fp64 oracle (tests/oracle.py) of the Triton kernel
   (through the interpreter) and of torch.optim.Adadelta, after 1 and 100 steps: the
   computation of tests/test_accuracy.py.
2. The bf16 linear regression of tests/test_mixed_precision.py: how far each bf16 mode's
   final loss lands from the fp32 run's, for seeds 0-2 (bf16 state with master weights
   among them).
3. bf16 and 8-bit state (issue 15) on scikit-learn's handwritten digits (the MLP of
   tests/test_compressed_state.py, 30 epochs, lr 1, rho 0.9): test loss and accuracy
   against fp32 state for seeds 0-2, and 2000 steps at lr 0.1, 1 and 10; on the CPU
   path's C loop (the kernel's bits).
4. Why 8-bit state rounds stochastically: the fp32 regression of 2. with AdaDelta
   written out in torch and its state stored through triton_adadelta.quant's code,
   rounded to nearest or stochastically (five noise seeds), against fp32 state.

Usage::

    python perf/numerics.py            # about 10 minutes on 2 cores

Writes ``perf/results/numerics.json`` (with the machine, versions and date).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The kernel runs through Triton's interpreter on CPU tensors: set before triton loads.
os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import machine_info  # noqa: E402
from test_accuracy import KEYS, ulp_errors  # noqa: E402
from test_compressed_state import digits_run  # noqa: E402
from test_mixed_precision import HYPER, regression_loss  # noqa: E402
from triton_adadelta import Adadelta  # noqa: E402


def accuracy() -> list[dict[str, object]]:
    rows = []
    for steps in (1, 100):
        errors = ulp_errors(steps)
        for key in KEYS:
            row: dict[str, object] = {"steps": steps, "quantity": key}
            for name in ("ours", "torch"):
                row[f"{name}_max_ulp"] = float(errors[name][key].max())
                row[f"{name}_p99_ulp"] = float(np.percentile(errors[name][key], 99))
            rows.append(row)
    return rows


def bf16_regression(seeds: list[int]) -> list[dict[str, object]]:
    modes = {
        "torch bf16": (torch.bfloat16, lambda p: torch.optim.Adadelta(p, **HYPER)),
        "ours bf16, fp32 state": (torch.bfloat16, lambda p: Adadelta(p, **HYPER)),
        "ours + stochastic rounding": (torch.bfloat16, lambda p: Adadelta(p, stochastic_rounding=True, **HYPER)),
        "ours + master weights": (torch.bfloat16, lambda p: Adadelta(p, master_weights=True, **HYPER)),
        "ours + master weights, bf16 state": (
            torch.bfloat16, lambda p: Adadelta(p, master_weights=True, state_dtype=torch.bfloat16, **HYPER)
        ),
        "ours + master weights, 8-bit state": (
            torch.bfloat16, lambda p: Adadelta(p, master_weights=True, state_dtype=torch.uint8, **HYPER)
        ),
    }
    rows = []
    for seed in seeds:
        fp32 = regression_loss(torch.float32, lambda p: torch.optim.Adadelta(p, **HYPER), seed=seed)
        row: dict[str, object] = {"seed": seed, "fp32_loss": fp32}
        for name, (dtype, make) in modes.items():
            row[name] = regression_loss(dtype, make, seed=seed) / fp32 - 1
        rows.append(row)
    return rows


def compressed_state(seeds: list[int], state_dtype: torch.dtype, label: str) -> dict[str, object]:
    """The digits runs of ``state_dtype`` against fp32 state (``label``: its name in the rows)."""
    # On the CPU path's C loop, which gives the kernel's bits in these modes (tested in
    # tests/test_cpu_path.py, tests/test_compressed_state.py and tests/test_u8_state_cpu.py):
    # the interpreter took over 20 minutes for these 12 000 steps.
    os.environ["TRITON_INTERPRET"] = "0"
    rows = []
    for seed in seeds:
        fp32, compressed = digits_run(torch.float32, seed), digits_run(state_dtype, seed)
        rows.append({
            "seed": seed, "fp32_test_loss": fp32["test_loss"], f"{label}_test_loss": compressed["test_loss"],
            "test_loss_off": compressed["test_loss"] / fp32["test_loss"] - 1,
            "fp32_test_accuracy": fp32["test_accuracy"], f"{label}_test_accuracy": compressed["test_accuracy"],
            "finite": fp32["finite"] and compressed["finite"],
        })  # fmt: skip
    mean_off = float(np.mean([row[f"{label}_test_loss"] for row in rows]) / np.mean([row["fp32_test_loss"] for row in rows]) - 1)
    accuracy_points = float(100 * np.mean([row[f"{label}_test_accuracy"] - row["fp32_test_accuracy"] for row in rows]))
    stability = [{"lr": lr, **digits_run(state_dtype, seed=1, lr=lr, steps=2000)} for lr in (0.1, 1.0, 10.0)]
    return {"digits": rows, "mean_test_loss_off": mean_off, "mean_accuracy_points_off": accuracy_points, "stability_2000_steps": stability}


def _regression_with_code(seed: int, noise_seed: int | None) -> float:
    """The regression's final loss with AdaDelta's state stored in the 8-bit code after
    every step: to nearest (``noise_seed`` None) or stochastically (16-bit noise from
    a generator), or kept in fp32 (``noise_seed`` -1). The update is torch's equations."""
    from triton_adadelta.quant import dequantize, quantize_

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=generator)
    y = x @ torch.randn(64, 1, generator=generator) + 0.1 * torch.randn(512, 1, generator=generator)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 1)
    params = list(model.parameters())
    state = [[torch.zeros(p.numel()), torch.zeros(p.numel())] for p in params]
    noise = None if noise_seed is None or noise_seed < 0 else torch.Generator().manual_seed(noise_seed)
    rho, eps = HYPER["rho"], 1e-6
    for _ in range(300):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for param, values in zip(params, state):
                grad = param.grad.reshape(-1)
                square_avg = values[0] * rho + grad * grad * (1 - rho)
                delta = (values[1] + eps).sqrt() / (square_avg + eps).sqrt() * grad
                acc_delta = values[1] * rho + delta * delta * (1 - rho)
                param.sub_(delta.view_as(param), alpha=HYPER["lr"])
                for k, new in enumerate((square_avg, acc_delta)):
                    if noise_seed is not None and noise_seed < 0:
                        values[k] = new
                        continue
                    codes, scales = torch.empty(new.numel(), dtype=torch.uint8), torch.empty(-(-new.numel() // 256))
                    bits = None if noise is None else torch.randint(0, 1 << 16, (new.numel(),), generator=noise)
                    # (square_avg's subnormal codes round up, as a step's do.)
                    quantize_(new, codes, scales, bits, round_up_small=bits is not None and k == 0)
                    values[k] = dequantize(codes, scales)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def code_rounding(seeds: list[int]) -> list[dict[str, object]]:
    rows = []
    for seed in seeds:
        fp32 = _regression_with_code(seed, -1)
        stochastic = [_regression_with_code(seed, 100 + k) / fp32 - 1 for k in range(5)]
        rows.append({
            "seed": seed, "fp32_loss": fp32, "nearest": _regression_with_code(seed, None) / fp32 - 1,
            "stochastic": stochastic, "stochastic_mean": float(np.mean(stochastic)),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args(argv)

    result = {
        "machine": machine_info(torch.device("cpu")), "accuracy": accuracy(), "bf16_regression": bf16_regression(args.seeds),
        "compressed_state": compressed_state(args.seeds, torch.bfloat16, "bf16_state"),
        "quantized_state": compressed_state(args.seeds, torch.uint8, "u8_state"),
        "code_rounding": code_rounding(args.seeds),
    }  # fmt: skip
    print("error against the fp64 oracle, fp32 ulps (20000 elements, lr 1, rho 0.9, eps 1e-6, weight decay 0.01)")
    print(f"{'after':>9} {'quantity':>11} {'ours max':>10} {'torch max':>10} {'ours p99':>9} {'torch p99':>9}")
    for row in result["accuracy"]:
        print(
            f"{row['steps']:>3} steps {row['quantity']:>11} {row['ours_max_ulp']:>10.2f} {row['torch_max_ulp']:>10.2f} "
            f"{row['ours_p99_ulp']:>9.3f} {row['torch_p99_ulp']:>9.3f}"
        )
    print("\nbf16 regression (512x64, 300 steps, lr 1, rho 0.9): final loss off the fp32 run's")
    names = [name for name in result["bf16_regression"][0] if name not in ("seed", "fp32_loss")]
    print(f"{'seed':>4} " + " ".join(f"{name:>27}" for name in names))
    for row in result["bf16_regression"]:
        print(f"{row['seed']:>4} " + " ".join(f"{row[name]:>+26.2%} " for name in names))
    for key, label, name in (("compressed_state", "bf16_state", "bf16"), ("quantized_state", "u8_state", "8-bit")):
        compressed = result[key]
        print(f"\n{name} state on the digits MLP (30 epochs, lr 1, rho 0.9): held-out loss and accuracy")
        print(f"{'seed':>4} {'fp32 loss':>10} {name + ' loss':>10} {'off':>8} {'fp32 acc':>9} {name + ' acc':>9}")
        for row in compressed["digits"]:
            print(f"{row['seed']:>4} {row['fp32_test_loss']:>10.4f} {row[label + '_test_loss']:>10.4f} {row['test_loss_off']:>+8.2%} "
                  f"{row['fp32_test_accuracy']:>9.2%} {row[label + '_test_accuracy']:>9.2%}")  # fmt: skip
        print(f"mean test loss off: {compressed['mean_test_loss_off']:+.2%}; accuracy: {compressed['mean_accuracy_points_off']:+.2f} points")
        for row in compressed["stability_2000_steps"]:
            print(f"2000 steps at lr {row['lr']:>4}: finite {row['finite']}, test accuracy {row['test_accuracy']:.2%}")
    print("\n8-bit code on the fp32 regression (torch's equations, state stored in the code): loss off fp32 state")
    for row in result["code_rounding"]:
        spread = " ".join(f"{value:+.1%}" for value in row["stochastic"])
        print(f"seed {row['seed']}: to nearest {row['nearest']:+.1%}; stochastic (5 noise seeds) {spread}, mean {row['stochastic_mean']:+.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "numerics.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
