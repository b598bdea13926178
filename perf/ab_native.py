"""A/B of the CPU path's C loop: this tree's ``csrc/adadelta_cpu.c`` against another
version of it, in one process, their steps alternated.

A change to the C loop is often worth a few percent, and this shared machine drifts
by more than that between runs minutes apart. So both libraries are built and loaded
in one process, one optimizer steps the same params with each in turn (the order
reversed every other round), and each mode reports the two medians and their ratio.
Both versions must export the same table layout (``cpu._build_native_library``
checks it); of the constants shared with the kernel, only those the base defines are checked.

Usage::

    python perf/ab_native.py --base HEAD~1                 # every mode, 16M params
    python perf/ab_native.py --base old.c --modes "bf16, master weights" --elements 1048576 --threads 1
    python perf/ab_native.py --base HEAD~1 --grads fresh   # new grads every round, as in training

``--grads fixed`` (the default) steps on one set of grads, as ``perf/bench_step.py``
does; under 8-bit state that leaves ~1% of ``square_avg``'s codes subnormal, which the
encoder handles on a slower way. ``--grads fresh`` draws new grads before each round
(outside the timing), so the state is a running average of changing grads.

Writes ``ab_native.json`` in ``--out`` (default ``perf/results/ab_native``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "0")
os.environ.setdefault("TRITON_ADADELTA_NATIVE_READER", "0")  # its background build would share the cores

import torch

from machine import REPO, machine_info, write_json
from sweep import tqdm

sys.path.append(str(REPO))
from triton_adadelta import Adadelta, cpu  # noqa: E402

# The modes compared: (param dtype, optimizer options).
MODES: dict[str, tuple[torch.dtype, dict[str, Any]]] = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16, master weights": (torch.bfloat16, {"master_weights": True}),
    "bf16, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "fp32, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32, 8-bit state": (torch.float32, {"state_dtype": torch.uint8}),
    "bf16, 8-bit state": (torch.bfloat16, {"state_dtype": torch.uint8}),
    "bf16, stochastic rounding, bf16 state": (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
    "bf16, stochastic rounding, 8-bit state": (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.uint8}),
}
SOURCE_PATH = "triton_adadelta/csrc/adadelta_cpu.c"


def base_source(base: str, directory: Path) -> Path:
    """The C source to compare against: a file, or the loop's source at a git revision."""
    if Path(base).is_file():
        return Path(base)
    result = subprocess.run(["git", "show", f"{base}:{SOURCE_PATH}"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"--base {base!r} is neither a file nor a git revision with {SOURCE_PATH}: {result.stderr.strip()}")
    path = directory / "adadelta_cpu.c"
    path.write_text(result.stdout)
    return path


def load(source: Path) -> Any:
    """The fused loop built from ``source`` (cached like the package's own), loaded.

    Only the kernel's constants that ``source`` defines are required and checked: a
    base from before a change of them (a new noise, say) is still timed, its bits aside.
    """
    text = source.read_text()
    previous = cpu._SOURCE, cpu._NATIVE_SYMBOLS, cpu._NATIVE_CONSTANTS
    cpu._SOURCE = source
    cpu._NATIVE_CONSTANTS = tuple(constant for constant in previous[2] if constant[0] in text)
    constants = {name for name, _, _ in previous[2]}
    cpu._NATIVE_SYMBOLS = tuple(name for name in previous[1] if name not in constants or name in text)
    try:
        return cpu._build_native_library()
    finally:
        cpu._SOURCE, cpu._NATIVE_SYMBOLS, cpu._NATIVE_CONSTANTS = previous


def compare(libraries: list[Any], mode: str, n_elements: int, rounds: int, fresh_grads: bool = False) -> dict[str, Any]:
    """Median step times of each library in ``mode``, steps alternated on one optimizer;
    ``fresh_grads``: new grads before each round (both libraries step on the same)."""
    dtype, options = MODES[mode]
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n_elements, generator=generator).to(dtype))
    param.grad = torch.randn(n_elements, generator=generator).to(dtype)
    optimizer = Adadelta([param], **options)
    times: list[list[float]] = [[] for _ in libraries]
    grads = torch.empty(n_elements) if fresh_grads else None

    def draw_grads() -> None:
        if grads is not None:
            param.grad.copy_(grads.normal_(generator=generator))

    for library in libraries * 3:  # warm-up: state made, caches and pages touched
        draw_grads()
        cpu._native_library = library
        optimizer.step()
    if optimizer.backends() != ["cpu-native"]:
        raise SystemExit(f"{mode}: the step ran {optimizer.backends()}, not the native loop")
    for round_ in tqdm(range(rounds), desc=mode, unit="round", leave=False):
        order = range(len(libraries)) if round_ % 2 == 0 else reversed(range(len(libraries)))
        draw_grads()
        for k in order:
            cpu._native_library = libraries[k]
            start = time.perf_counter()
            optimizer.step()
            times[k].append(time.perf_counter() - start)
    medians = [statistics.median(samples) * 1e3 for samples in times]
    return {
        "mode": mode,
        "grads": "fresh" if fresh_grads else "fixed",
        "n_elements": n_elements,
        "rounds": rounds,
        "base_ms": medians[0],
        "new_ms": medians[1],
        "base_iqr_ms": statistics.quantiles([t * 1e3 for t in times[0]], n=4)[::2],
        "new_iqr_ms": statistics.quantiles([t * 1e3 for t in times[1]], n=4)[::2],
        "new_vs_base": medians[1] / medians[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a git revision, or a C source file")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--elements", type=int, default=16_000_000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--grads", choices=["fixed", "fresh"], default="fixed",
                        help="one set of grads for every step (bench_step's), or new ones each round")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results" / "ab_native")
    args = parser.parse_args(argv)
    if args.elements < 1 or args.rounds < 3:
        parser.error("--elements must be positive and --rounds at least 3")
    torch.set_num_threads(args.threads)
    if cpu.native_library() is None:
        raise SystemExit("no native CPU loop here (see the warning above): nothing to compare")
    with tempfile.TemporaryDirectory() as directory:
        base = base_source(args.base, Path(directory))
        libraries = [load(base), load(cpu._SOURCE)]
    results = [compare(libraries, mode, args.elements, args.rounds, args.grads == "fresh") for mode in args.modes]
    record = {
        "machine": machine_info(torch.device("cpu")),
        "base": args.base,
        "threads": args.threads,
        "grads": args.grads,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ab_native.json", record)
    print(f"base {args.base} against this tree, {args.elements} params, {args.threads} threads, {args.grads} grads "
          f"(medians of {args.rounds}):")
    for row in results:
        print(f"  {row['mode']:28} {row['base_ms']:8.3f} ms -> {row['new_ms']:8.3f} ms   {row['new_vs_base']:.3f}x")
    print(f"wrote {args.out / 'ab_native.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
