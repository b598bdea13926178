"""Time whole ``step()`` calls of ``triton_adadelta.Adadelta`` against torch's Adadelta.

Each shape is a list of fp32 params with fixed random grads (the rows of
``MODE_SHAPES`` have bf16 params or ours in a mode: master weights, stochastic
rounding or bf16 state); the "zero_grad" shapes time ``step()`` + ``zero_grad()`` of a training
loop instead (see ``LOOPS``). The
optimizers (ours, ``torch.optim.Adadelta(foreach=True)``, ``(foreach=False)`` and,
unless ``--quick``, ``torch.compile(torch.optim.Adadelta(...).step)``) and three
bandwidth probes (a copy, a STREAM triad and ``a += b``: see ``PROBES``) are timed
round-robin, one call each per round, in a rotating order, after warm-ups.
Reported: medians, the interquartile range, the speed-up over torch's best eager
median and over compiled torch, and the time as a multiple of the bytes floor (28
B/param for fp32, the mode's bytes for bf16, at the best probe's bandwidth). torch.compile's first call is timed
per shape list in processes of their own, in a fresh inductor cache and from it.

On a machine without a GPU this times the CPU path (``TRITON_INTERPRET`` must be
unset); with a GPU it times CUDA tensors and the Triton kernel.

Usage::

    python perf/bench_step.py            # full run: compiled torch's cold compiles take minutes
    python perf/bench_step.py --quick    # a short run without compiled torch, about 1 minute
    python perf/bench_step.py --no-compiled --threads 1 --shapes "16M bf16 in 100, 8-bit state"

Writes ``perf/results/bench_step_<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench_step.py times the real backends: unset TRITON_INTERPRET")

import torch  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
# After any installed copy: an editable install maps triton_adadelta.kernels, a bare checkout cannot.
sys.path.append(str(REPO))

import triton_adadelta  # noqa: E402
from machine import machine_info, write_json  # noqa: E402
from triton_adadelta.reader import param_reader, reader_status  # noqa: E402
from triton_adadelta.update import update_  # noqa: E402

# Bytes one fp32 param moves in a fused step: read p g v u, write p v u.
FLOOR_BYTES_PER_PARAM = 28
# Bandwidth probes, timed in the same rounds: (bytes counted per element, how to run
# it on arrays a, b, c of PROBE_BYTES each). The floor is the best probe's bandwidth.
# A copy and a STREAM triad write lines they never read, which the CPU reads first
# all the same (write-allocate): they see less bandwidth than a step, which reads
# every line it writes. `a += b` reads every line it writes, as the update does.
PROBE_BYTES = 128 << 20
PROBES: dict[str, tuple[int, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]]] = {
    "copy": (8, lambda a, b, c: a.copy_(b)),
    "triad": (12, lambda a, b, c: torch.add(b, c, alpha=3.0, out=a)),
    "add_": (12, lambda a, b, c: a.add_(b)),
}


def transformer_shapes(d_model: int = 512, layers: int = 6, vocab: int = 8192) -> list[tuple[int, ...]]:
    """Param shapes of a small pre-norm transformer: embeddings, attention, MLP, norms."""
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (1024, d_model)]
    for _ in range(layers):
        shapes += [
            (d_model,), (d_model,),  # attention layer norm
            (3 * d_model, d_model), (3 * d_model,),  # qkv projection
            (d_model, d_model), (d_model,),  # output projection
            (d_model,), (d_model,),  # MLP layer norm
            (4 * d_model, d_model), (4 * d_model,),  # MLP up
            (d_model, 4 * d_model), (d_model,),  # MLP down
        ]  # fmt: skip
    return shapes + [(d_model,), (d_model,)]


SHAPES: dict[str, list[tuple[int, ...]]] = {
    "1000 x 100": [(100,)] * 1000,
    "1000 x 100, zero_grad": [(100,)] * 1000,
    "1000 x 100, zero_grad(False)": [(100,)] * 1000,
    "1000 x 100, zero_grad, grads set in Python": [(100,)] * 1000,
    "16M in 100": [(160_000,)] * 100,
    "16M in 4": [(4_000_000,)] * 4,
    "transformer 23M": transformer_shapes(),
    "16M bf16 in 100, master weights": [(160_000,)] * 100,
    "16M bf16 in 100, stochastic rounding": [(160_000,)] * 100,
    "16M in 100, bf16 state": [(160_000,)] * 100,
    "16M bf16 in 100, bf16 state": [(160_000,)] * 100,
    "16M in 100, 8-bit state": [(160_000,)] * 100,
    "16M bf16 in 100, 8-bit state": [(160_000,)] * 100,
}

# Shapes with a mode of their own: (param dtype, our options, bytes one param moves in
# our fused step). Every optimizer of the row gets params of that dtype; torch's keeps
# its state in the param dtype.
#   bf16, master weights: read g (2) and the fp32 master, v, u (12); write them (12) and p (2).
#   bf16, stochastic rounding: read p g (4) v u (8); write p (2) v u (8).
#   fp32, bf16 state: read p g (8) v u (4); write p (4) v u (4).
#   bf16, bf16 state: read p g (4) v u (4); write p (2) v u (4).
#   fp32, 8-bit state: read p g (8) v u (2); write p (4) v u (2); and 4 fp32 scales per
#   256 params (0.0625).
#   bf16, 8-bit state: read p g (4) v u (2); write p (2) v u (2); the scales.
MODE_SHAPES: dict[str, tuple[torch.dtype, dict[str, object], float]] = {
    "16M bf16 in 100, master weights": (torch.bfloat16, {"master_weights": True}, 28),
    "16M bf16 in 100, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}, 22),
    "16M in 100, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}, 20),
    "16M bf16 in 100, bf16 state": (torch.bfloat16, {"state_dtype": torch.bfloat16}, 14),
    "16M in 100, 8-bit state": (torch.float32, {"state_dtype": torch.uint8}, 16.0625),
    "16M bf16 in 100, 8-bit state": (torch.bfloat16, {"state_dtype": torch.uint8}, 10.0625),
}


# Rows of compressed state also time ours with fp32 state (the same params and mode
# otherwise) in the same rounds: on a shared machine only interleaved runs compare.
FP32_STATE = "triton_adadelta, fp32 state"


def dtype_of(name: str) -> torch.dtype:
    return MODE_SHAPES[name][0] if name in MODE_SHAPES else torch.float32


def floor_bytes_of(name: str) -> float:
    return MODE_SHAPES[name][2] if name in MODE_SHAPES else FLOOR_BYTES_PER_PARAM


# The rows timed with compiled torch too: grads kept. (The loop rows would compile
# the same 1000-param step again, minutes each on 2 cores.)
COMPILED_SHAPES = ["1000 x 100", "16M in 100", "16M in 4", "transformer 23M", *MODE_SHAPES]


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


# Shapes timed as a training loop, with zero_grad() each step. The timed call is
# step() + zero_grad(), the optimizer's share of an iteration, and each part is also
# timed on its own. Before the timer starts, a real autograd backward (of
# sum(param * fixed grad)) gives the grads, as in training:
# - "set_to_none" (torch's default zero_grad()): autograd gives every param a new grad
#   tensor, made in C++, which both optimizers read where it is; zero_grad() frees them.
# - "in_place" (zero_grad(set_to_none=False)): autograd accumulates into the grads that
#   are there, and zero_grad() zeroes them.
# - "set_in_python": as "set_to_none", but each grad is assigned from Python
#   (param.grad = grad.clone()), as this script did before it ran autograd. Such a grad
#   carries a Python object, which zero_grad() must free as well (about 0.3 us each here).
LOOPS = {
    "1000 x 100, zero_grad": "set_to_none",
    "1000 x 100, zero_grad(False)": "in_place",
    "1000 x 100, zero_grad, grads set in Python": "set_in_python",
}
LOOP_TIMED = {
    None: "step(), grads kept",
    "set_to_none": "step() + zero_grad(), new grads from autograd each step",
    "in_place": "step() + zero_grad(set_to_none=False), grads accumulated by autograd",
    "set_in_python": "step() + zero_grad(), new grads assigned in Python each step",
}


def make_params(
    shapes: list[tuple[int, ...]], device: torch.device, seed: int, dtype: torch.dtype = torch.float32
) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
        param.grad = torch.randn(shape, generator=generator).to(device, dtype)
        params.append(param)
    return params


def quantiles(samples: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "min": min(samples), "max": max(samples)}


def bench_shape(
    name: str,
    shapes: list[tuple[int, ...]],
    device: torch.device,
    *,
    warmup: int,
    budget_s: float,
    max_rounds: int,
    loop: str | None = None,
    compiled: bool = True,
    inductor_cache: Path | None = None,
) -> dict[str, object]:
    """Round-robin timing of the optimizers and the bandwidth probes, for one shape."""
    timed = make_timer(device)
    n_params = sum(torch.Size(shape).numel() for shape in shapes)
    dtype, options = dtype_of(name), MODE_SHAPES.get(name, (None, {}, 0))[1]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "triton_adadelta": triton_adadelta.Adadelta(make_params(shapes, device, 0, dtype), lr=1.0, **options),
        "torch foreach": torch.optim.Adadelta(make_params(shapes, device, 0, dtype), lr=1.0, foreach=True),
        "torch for-loop": torch.optim.Adadelta(make_params(shapes, device, 0, dtype), lr=1.0, foreach=False),
    }
    if "state_dtype" in options:
        fp32_state = {key: value for key, value in options.items() if key != "state_dtype"}
        optimizers[FP32_STATE] = triton_adadelta.Adadelta(make_params(shapes, device, 0, dtype), lr=1.0, **fp32_state)
    if compiled:
        optimizers["torch compiled"] = torch.optim.Adadelta(make_params(shapes, device, 0, dtype), lr=1.0)
    steps = {label: optimizer.step for label, optimizer in optimizers.items()}
    if compiled:
        # torch's recipe: the whole step compiled (inductor fuses it into one loop),
        # from the inductor cache that compile_delays filled for this shape list.
        if inductor_cache is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
        torch._dynamo.reset()
        steps["torch compiled"] = torch.compile(optimizers["torch compiled"].step)
    arrays = [torch.full((PROBE_BYTES // 4,), float(k + 1), device=device) for k in range(3)]
    # Each action is (untimed preparation or None, timed call).
    actions: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]] = {}
    # Per-round times of step() and of zero_grad() alone, for the loop shapes.
    parts: dict[str, dict[str, list[float]]] = {}
    for label, optimizer in optimizers.items():
        if loop is None:
            actions[label] = (None, steps[label])
            continue
        params = optimizer.param_groups[0]["params"]
        grads = [param.grad.detach().clone() for param in params]
        ones = [torch.ones_like(grad) for grad in grads]
        optimizer.zero_grad(set_to_none=loop != "in_place")
        parts[label] = {"step()": [], "zero_grad()": []}

        def backward(params: list[torch.Tensor] = params, grads: list[torch.Tensor] = grads) -> None:
            if loop == "set_in_python":
                for param, grad in zip(params, grads):
                    param.grad = grad.clone()
                return
            with torch.enable_grad():
                torch.autograd.backward(torch._foreach_mul(params, grads), ones)

        def step_and_zero_grad(
            optimizer: torch.optim.Optimizer = optimizer, split: dict = parts[label], step: Callable = steps[label]
        ) -> None:
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            middle = time.perf_counter()
            optimizer.zero_grad(set_to_none=loop != "in_place")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            split["step()"].append(middle - start)
            split["zero_grad()"].append(time.perf_counter() - middle)

        actions[label] = (backward, step_and_zero_grad)
    for probe, (_, run_probe) in PROBES.items():
        actions[f"probe {probe}"] = (None, lambda run_probe=run_probe: run_probe(*arrays))

    def run(label: str) -> float:
        prepare, action = actions[label]
        if prepare is not None:
            prepare()
        return timed(action)

    for label in actions:
        for _ in range(warmup):
            run(label)
    # As many rounds as fit the budget, judged from one timed round.
    first_round = {label: run(label) for label in actions}
    rounds = max(5, min(max_rounds, int(budget_s / sum(first_round.values()))))
    for split in parts.values():
        for part_samples in split.values():
            part_samples.clear()
    samples: dict[str, list[float]] = {label: [] for label in actions}
    labels = list(actions)
    for round_index in range(rounds):
        # Rotate the order so that no optimizer always runs right after the copy.
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            samples[label].append(run(label))

    # Bytes read + written per second, by each probe's median; the floor takes the best.
    probe_bandwidth = {
        probe: bytes_per_element * (PROBE_BYTES // 4) / statistics.median(samples.pop(f"probe {probe}"))
        for probe, (bytes_per_element, _) in PROBES.items()
    }
    bandwidth = max(probe_bandwidth.values())
    floor_s = floor_bytes_of(name) * n_params / bandwidth
    stats = {label: quantiles(values) for label, values in samples.items()}
    torch_best = min(stats["torch foreach"]["median"], stats["torch for-loop"]["median"])
    ours = stats["triton_adadelta"]["median"]
    compiled_ratio = stats["torch compiled"]["median"] / ours if compiled else None
    return {
        "shape": name,
        "timed": LOOP_TIMED[loop],
        "n_tensors": len(shapes),
        "n_params": n_params,
        "param_dtype": str(dtype).removeprefix("torch."),
        "options": {key: str(value) if isinstance(value, torch.dtype) else value for key, value in options.items()},
        "floor_bytes_per_param": floor_bytes_of(name),
        "rounds": rounds,
        "copy_bandwidth_GBps": probe_bandwidth["copy"] / 1e9,
        "probe_bandwidth_GBps": {probe: value / 1e9 for probe, value in probe_bandwidth.items()},
        "floor_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms": floor_s * 1e3,
        "timings_ms": {label: {k: v * 1e3 for k, v in s.items()} for label, s in stats.items()},
        "speedup_vs_torch_best": torch_best / ours,
        # torch compiled's median over ours (above 1: ours is faster).
        "speedup_vs_torch_compiled": compiled_ratio,
        "ours_x_floor": ours / floor_s,
        # Compressed-state rows: ours over ours with fp32 state (below 1: faster).
        "ours_vs_fp32_state": ours / stats[FP32_STATE]["median"] if FP32_STATE in stats else None,
        "torch_best_x_floor": torch_best / floor_s,
        "backends": optimizers["triton_adadelta"].backends(),  # type: ignore[attr-defined]
        # Loop shapes: the medians of step() and zero_grad() alone, in the same rounds.
        "parts_ms": {
            label: {part: statistics.median(values) * 1e3 for part, values in split.items()}
            for label, split in parts.items()
        },
    }


def step_overhead(device: torch.device, n_params: int = 1000, size: int = 100, repeats: int = 200) -> dict[str, float]:
    """Medians (us) of the parts of one step() on many small params, to find the Python cost."""
    optimizer = triton_adadelta.Adadelta(make_params([(size,)] * n_params, device, 0), lr=1.0)
    optimizer.step()
    (flat,) = optimizer.flat_states()
    plan = flat.plan()
    assert plan is not None
    hparams = flat.hparams(optimizer.param_groups)
    timed = make_timer(device)

    def update() -> None:
        update_(plan.table, flat.square_avg, flat.acc_delta, hparams=hparams)

    parts: dict[str, Callable[[], object]] = {
        "step()": optimizer.step,
        "FlatState.plan (grads kept)": flat.plan,
        "FlatState.hparams": lambda: flat.hparams(optimizer.param_groups),
        "update_ (one launch)": update,
    }
    samples: dict[str, list[float]] = {label: [] for label in parts}
    for _ in range(repeats):
        for label, part in parts.items():
            samples[label].append(timed(part))
    return {label: statistics.median(values) * 1e6 for label, values in samples.items()}


def inductor_cache_for(name: str, root: Path) -> Path:
    """The inductor cache of a shape list (shapes with the same params share one)."""
    return root / str(abs(hash((tuple(SHAPES[name]), str(dtype_of(name))))))


def compile_delays(names: list[str], root: Path) -> dict[str, dict[str, float]]:
    """torch.compile's first call of ``torch.optim.Adadelta.step`` per distinct shape
    list: in a fresh inductor cache (cold), then again from it (cached), each in a
    process of its own. The timed rounds then compile from that cache."""
    delays: dict[str, dict[str, float]] = {}
    done: dict[tuple[object, ...], str] = {}
    for name in names:
        key = (tuple(SHAPES[name]), str(dtype_of(name)))
        if key in done:
            delays[name] = delays[done[key]]
            continue
        done[key] = name
        code = (
            "import sys, time, torch\n"
            f"params = [torch.nn.Parameter(torch.randn(shape).to({key[1]})) for shape in {SHAPES[name]!r}]\n"
            "for param in params: param.grad = torch.randn_like(param)\n"
            "step = torch.compile(torch.optim.Adadelta(params, lr=1.0).step)\n"
            "start = time.perf_counter(); step(); print(time.perf_counter() - start)"
        )
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_cache_for(name, root)))
        delays[name] = {}
        for label in ("cold_s", "cached_s"):
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            delays[name][label] = float(result.stdout.split()[-1])
        print(f"  torch.compile of Adadelta.step on {name}: {delays[name]['cold_s']:.1f} s cold, "
              f"{delays[name]['cached_s']:.1f} s cached")  # fmt: skip
    return delays


# The libraries compiled at first use: (label, module, call that builds or loads it).
NATIVE_LIBRARIES = [("native CPU loop", "cpu", "native_library()"), ("param reader", "reader", "param_reader(wait=True)")]


def native_build_delay() -> dict[str, dict[str, float | bool]]:
    """First-call delay of each compiled library: built in a fresh cache, then loaded from it."""
    delays: dict[str, dict[str, float | bool]] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        python_path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
        env = dict(os.environ, TRITON_ADADELTA_CACHE_DIR=cache_dir, PYTHONPATH=python_path)
        for label, module, function in NATIVE_LIBRARIES:
            code = (
                f"import time, torch; from triton_adadelta import {module}; start = time.perf_counter(); "
                f"library = {module}.{function}; print(time.perf_counter() - start, library is not None)"
            )
            delays[label] = {}
            for key in ("cold_cache_s", "warm_cache_s"):
                result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                seconds, available = result.stdout.split()
                delays[label][key] = float(seconds)
                delays[label]["available"] = available == "True"
    return delays


def format_table(results: list[dict[str, object]]) -> str:
    compiled = any("torch compiled" in r["timings_ms"] for r in results)  # type: ignore[operator]
    header = (
        f"{'shape':<42} {'params':>9} {'ours ms':>16} {'foreach ms':>16} {'for-loop ms':>16} "
        + (f"{'compiled ms':>16} " if compiled else "")
        + f"{'speed-up':>8} " + (f"{'vs comp.':>8} " if compiled else "")
        + f"{'floor ms':>8} {'ours/floor':>10} {'torch/floor':>11} {'floor GB/s':>10} {'copy GB/s':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        timings = result["timings_ms"]
        assert isinstance(timings, dict)

        def cell(label: str) -> str:
            if label not in timings:
                return "-"
            stats = timings[label]
            return f"{stats['median']:7.3f} [{stats['q1']:.2f}-{stats['q3']:.2f}]"

        lines.append(
            f"{result['shape']:<42} {result['n_params']:>9} {cell('triton_adadelta'):>16} "
            f"{cell('torch foreach'):>16} {cell('torch for-loop'):>16} "
            + (f"{cell('torch compiled'):>16} " if compiled else "")
            + f"{result['speedup_vs_torch_best']:>7.1f}x "
            + (f"{vs_compiled:>7.2f}x " if (vs_compiled := result["speedup_vs_torch_compiled"]) else f"{'-':>8} ")
            * compiled
            + f"{result['floor_ms']:>8.3f} {result['ours_x_floor']:>9.2f}x {result['torch_best_x_floor']:>10.2f}x "
            f"{result['floor_bandwidth_GBps']:>10.1f} {result['copy_bandwidth_GBps']:>9.1f}"
        )
    lines.append("times: median [q1-q3] over interleaved rounds; speed-up: torch's best eager median / ours;")
    lines.append("  vs comp.: torch.compile'd torch.optim.Adadelta's median / ours;")
    lines.append("  floor: the row's bytes per param (28 for fp32 and bf16 with master weights, 22 for bf16 with")
    lines.append("  stochastic rounding, 20 and 14 for fp32 and bf16 with bf16 state, 16.06 and 10.06 with 8-bit")
    lines.append("  state) at the best probe's")
    lines.append("  bandwidth (copy, STREAM triad, a += b); bf16 rows: every optimizer on bf16 params, ours")
    lines.append("  with the mode the row names")
    state_rows = [result for result in results if result.get("ours_vs_fp32_state")]
    if state_rows:
        lines.append("compressed-state rows: ours with fp32 state in the same rounds (ms), and the row's median over it:")
    for result in state_rows:
        fp32_state = result["timings_ms"][FP32_STATE]  # type: ignore[index]
        lines.append(
            f"  {result['shape']}: fp32 state {fp32_state['median']:.3f} [{fp32_state['q1']:.2f}-{fp32_state['q3']:.2f}]; "
            f"{result['shape'].rsplit(', ', 1)[1]} / fp32 state {result['ours_vs_fp32_state']:.2f}x"
        )
    lines.append("zero_grad rows: step() + zero_grad() timed together; grads from a real autograd backward,")
    lines.append("  or assigned in Python where the row says so. Medians of each part alone:")
    for result in results:
        parts = result.get("parts_ms")
        if parts:
            cells = "; ".join(
                f"{label} {split['step()']:.3f} + {split['zero_grad()']:.3f}"  # type: ignore[index]
                for label, split in parts.items()  # type: ignore[union-attr]
            )
            lines.append(f"  {result['shape']}: step() + zero_grad() ms: {cells}")
    return "\n".join(lines)


def plot(results: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in ("triton_adadelta", "torch foreach", "torch for-loop", "torch compiled")
              if any(label in r["timings_ms"] for r in results)]  # type: ignore[operator]  # fmt: skip
    figure, axis = plt.subplots(figsize=(max(15.0, 1.4 * len(results)), 5.5))  # room for every row's label
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        timed = [(j, r["timings_ms"][label]) for j, r in enumerate(results) if label in r["timings_ms"]]  # type: ignore[operator,index]
        medians = [stats["median"] for _, stats in timed]
        errors = [[stats["median"] - stats["q1"] for _, stats in timed], [stats["q3"] - stats["median"] for _, stats in timed]]
        positions = [j + (i - (len(labels) - 1) / 2) * width for j, _ in timed]
        axis.bar(positions, medians, width, yerr=errors, label=label, capsize=2)
    for j, result in enumerate(results):
        floor = result["floor_ms"]
        axis.hlines(floor, j - 0.4, j + 0.4, colors="black", linestyles="--",
                    label="bytes floor (the row's B/param at the best probe's bandwidth)" if j == 0 else None)  # fmt: skip
    axis.set_xticks(range(len(results)), [textwrap.fill(str(r["shape"]), 14, break_long_words=False) for r in results], fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("ms per timed call (median, IQR bars)")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and warm-ups (about 1 minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timed rounds per shape (default 40, --quick 8)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU: the threads torch and our C loop run on (default: torch's own, the cores); "
        "8-bit state is bound by arithmetic and fp32 state by memory, so their ratio moves with it",
    )  # fmt: skip
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the results file in --out, timing nothing")
    parser.add_argument("--no-build-timing", action="store_true", help="CPU: skip timing the native library's first build")
    parser.add_argument(
        "--compiled", action=argparse.BooleanOptionalAction, default=None,
        help="time torch.compile'd torch.optim.Adadelta too, and its cold and cached compile "
        "(default: on, off with --quick: a cold compile of 1000 x 100 params takes minutes)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)  # (before machine_info, which records it)
    if args.replot:
        stem = args.out / f"bench_step_{device.type}"
        record = json.loads(stem.with_suffix(".json").read_text())
        machine = record["machine"]
        plot(record["results"], stem.with_suffix(".png"), f"AdaDelta step(), {machine.get('gpu', machine['cpu_model'])}")
        print(f"wrote {stem.with_suffix('.png')}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"no CUDA device: torch {torch.__version__} sees none")
    warmup, budget_s, max_rounds = (2, 8.0, 15) if args.quick else (5, 40.0, 60)
    if args.budget_s is not None:
        budget_s = args.budget_s
    info = machine_info(device)
    print(f"{info['cpu_model']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
          f"{info.get('gpu', 'no GPU')}; torch {info['torch']}, triton {info['triton']}")  # fmt: skip

    build = native_build_delay() if device.type == "cpu" and not args.no_build_timing else {}
    if build:
        for label, delay in build.items():
            print(f"{label}: available={delay['available']}, first call in a fresh cache "
                  f"{delay['cold_cache_s']:.2f} s (compile), from the cache {delay['warm_cache_s']:.2f} s")  # fmt: skip

    compiled = (not args.quick) if args.compiled is None else args.compiled
    inductor_root = Path(tempfile.mkdtemp(prefix="bench_step_inductor_"))
    atexit.register(shutil.rmtree, inductor_root, True)  # (the compiled steps' caches: gone at exit)
    compiled_shapes = [name for name in args.shapes if compiled and name in COMPILED_SHAPES]
    compile_delay = compile_delays(compiled_shapes, inductor_root)

    # Every timed step reads its params through the native reader (built in the
    # background at first use otherwise, so the warm-ups would time the Python reads).
    param_reader(wait=True)
    print(f"param reader: {reader_status()}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_step_{device.type}"
    record: dict[str, object] = {
        "machine": info,
        "quick": args.quick,
        "budget_s_per_shape": budget_s,
        "floor_bytes_per_param": FLOOR_BYTES_PER_PARAM,
        "native_cpu_build": build,
        "torch_compile_first_call": compile_delay,
        "param_reader": reader_status(),
        "complete": False,
        "results": [],
    }
    results: list[dict[str, object]] = []
    for name in args.shapes:
        result = bench_shape(
            name, SHAPES[name], device, warmup=warmup, budget_s=budget_s, max_rounds=max_rounds,
            loop=LOOPS.get(name), compiled=name in compiled_shapes, inductor_cache=inductor_cache_for(name, inductor_root),
        )  # fmt: skip
        results.append(result)
        print(f"  {name}: {result['rounds']} rounds, ours {result['timings_ms']['triton_adadelta']['median']:.3f} ms")
        # After every shape, so a run cut short keeps the shapes it timed.
        write_json(args.out / f"{stem}.json", {**record, "results": results})
    table = format_table(results)
    print(table)

    overhead = step_overhead(device) if device.type == "cpu" else {}
    if overhead:
        print("\nstep() on 1000 params x 100 elements, median us per call:")
        for label, micros in overhead.items():
            print(f"  {label:<34} {micros:8.1f}")

    record.update({"complete": True, "results": results, "step_overhead_us_1000x100": overhead, "table": table})
    write_json(args.out / f"{stem}.json", record)
    print(f"\nwrote {args.out / (stem + '.json')}")
    try:
        plot(results, args.out / f"{stem}.png", f"AdaDelta step(), {info.get('gpu', info['cpu_model'])}")
        print(f"wrote {args.out / (stem + '.png')}")
    except ImportError as error:
        print(f"plot skipped: {error.name} not installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
