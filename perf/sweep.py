"""The autotune sweep of ``adadelta_kernel``: on a GPU, or compiled ahead of time without one.

With a GPU (CUDA or ROCm), for a range of buffer sizes and every dtype mode:
every config of ``configs_for(dtype, warp size)`` is timed with ``triton.testing.do_bench``,
the written buffers restored before every run (the restore is timed alone and
subtracted); ``torch.optim.Adadelta`` (foreach and for-loop) runs on the same size
in the same run. Reported: GB/s at the mode's bytes floor and % of the measured
device-to-device copy bandwidth. The best config per size bucket goes to a results
JSON (machine, versions, date), with a PNG of GB/s against size and the roofline::

    python perf/sweep.py --out perf/results

Without a GPU, ``--target sm_90`` (or ``sm_80``, ``gfx942``) compiles every config of
every dtype mode ahead of time and reports registers, spills, the vector width of
the streamed global accesses and the bytes per element; each kernel's ``.ptx`` and
``.cubin`` (``.amdgcn`` and ``.hsaco`` for gfx942) go under ``--out``::

    python perf/sweep.py --target sm_90 --out perf/results/sm_90
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import machine_info  # noqa: E402
from triton_adadelta.kernels import aot  # noqa: E402
from triton_adadelta.kernels.adadelta import adadelta_kernel, configs_for, size_bucket  # noqa: E402

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def config_label(config: triton.Config) -> str:
    return f"B{config.kwargs['BLOCK_SIZE']}_w{config.num_warps}"


# ------------------------------------------------------------ ahead of time
def sweep_ahead_of_time(target: str, out: Path, modes: list[str]) -> dict[str, Any]:
    """Compile every config of every mode for ``target``; write the code; return the rows."""
    rows = []
    warp_size = aot.TARGETS[target].warp_size
    jobs = [(mode, config) for mode in modes for config in configs_for(aot.param_dtype(mode), warp_size)]
    for mode, config in tqdm(jobs, desc=f"compiling for {target}", unit="kernel"):
        block_size, num_warps = config.kwargs["BLOCK_SIZE"], config.num_warps
        compiled, report = aot.compile_and_inspect(mode, block_size, num_warps, target)
        directory = out / mode.replace("+", "_")
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"adadelta_{config_label(config)}"
        for key, suffix in (("ptx", ".ptx"), ("cubin", ".cubin"), ("amdgcn", ".amdgcn"), ("hsaco", ".hsaco"), ("ttgir", ".ttgir")):
            if key in compiled.asm:
                content = compiled.asm[key]
                path = stem.with_suffix(suffix)
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
        rows.append(
            {
                "mode": mode,
                "config": config_label(config),
                "BLOCK_SIZE": block_size,
                "num_warps": num_warps,
                "registers": report.registers,
                "spill_bytes": report.spill_bytes,
                "vector_bits": report.vector_bits,
                "load_widths": report.load_widths,
                "store_widths": report.store_widths,
                "bytes_per_element": report.bytes_per_element,
                "floor_bytes": report.floor_bytes,
                "offsets_64bit": report.offsets_64bit,
                "ok": report.vector_bits == 128 and report.spill_bytes == 0 and report.at_floor and report.offsets_64bit,
            }
        )
    return {"target": target, "rows": rows}


def format_aot_table(result: dict[str, Any]) -> str:
    header = f"{'mode':<12} {'config':<9} {'regs':>4} {'spill B':>7} {'vector':>6} {'B/elem':>6} {'floor':>5} {'i64 offs':>8}  ok"
    lines = [f"target {result['target']}", header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(
            f"{row['mode']:<12} {row['config']:<9} {row['registers']:>4} {row['spill_bytes']:>7} "
            f"{row['vector_bits']:>4}-b {row['bytes_per_element']:>6} {row['floor_bytes']:>5} "
            f"{str(row['offsets_64bit']):>8}  {'yes' if row['ok'] else 'NO'}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------- GPU
class Buffers:
    """The flat buffers of one dtype mode on the GPU, with a saved copy to restore."""

    def __init__(self, mode: aot.DtypeMode, n_elements: int, device: torch.device) -> None:
        param_dtype, state_dtype = _TORCH_DTYPES[mode.param], _TORCH_DTYPES[mode.state]
        generator = torch.Generator(device=device).manual_seed(0)
        self.n_elements = n_elements
        self.param = torch.randn(n_elements, device=device, dtype=param_dtype, generator=generator)
        self.grad = torch.randn(n_elements, device=device, dtype=param_dtype, generator=generator)
        self.square_avg = torch.rand(n_elements, device=device, dtype=state_dtype, generator=generator)
        self.acc_delta = torch.rand(n_elements, device=device, dtype=state_dtype, generator=generator) * 1e-3
        self.master = self.param.float() if mode.master else None
        self.step = torch.zeros(1, device=device)
        self.hparams = torch.tensor([0.9, 0.1, 1e-6, 0.0, 1.0], device=device, dtype=torch.float64)
        self.mode = mode
        self.written = [self.param, self.square_avg, self.acc_delta, self.step] + ([self.master] if mode.master else [])
        self.saved = [tensor.clone() for tensor in self.written]

    def restore(self) -> None:
        for tensor, saved in zip(self.written, self.saved):
            tensor.copy_(saved)

    def launch(self, block_size: int, num_warps: int) -> None:
        fp64 = self.mode.param == "fp64"
        grid = (max(1, triton.cdiv(self.n_elements, block_size)),)
        adadelta_kernel.fn[grid](
            self.param, self.grad, self.square_avg, self.acc_delta, self.master, self.step,
            None, self.hparams if fp64 else None, None, None,
            self.n_elements, 1, size_bucket(self.n_elements),
            1.0, 0.9, 0.1, 1e-6, 0.0, 1234,
            MAXIMIZE=False, HAS_MASTER=self.mode.master, STOCHASTIC_ROUNDING=self.mode.stochastic_rounding,
            LR_IS_TENSOR=False, HPARAMS_IN_TENSOR=fp64, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
            COMPUTE_DTYPE=triton.language.float64 if fp64 else triton.language.float32,
            enable_fp_fusion=False, BLOCK_SIZE=block_size, num_warps=num_warps,
        )  # fmt: skip


def time_restored(launch: Callable[[], None], restore: Callable[[], None]) -> float:
    """Median ms of ``launch`` alone: do_bench of restore+launch minus do_bench of restore."""
    from triton.testing import do_bench

    both = do_bench(lambda: (restore(), launch()), return_mode="median")
    restore_only = do_bench(restore, return_mode="median")
    return max(both - restore_only, 1e-6)


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written)."""
    from triton.testing import do_bench

    source = torch.empty(n_bytes // 4, device=device)
    target = torch.empty_like(source)
    milliseconds = do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * n_bytes / (milliseconds * 1e-3)


def time_torch_adadelta(mode: aot.DtypeMode, n_elements: int, device: torch.device, foreach: bool) -> float:
    """Median ms of one torch.optim.Adadelta step on one param of the mode's dtype."""
    from triton.testing import do_bench

    param = torch.nn.Parameter(torch.randn(n_elements, device=device, dtype=_TORCH_DTYPES[mode.param]))
    param.grad = torch.randn_like(param)
    optimizer = torch.optim.Adadelta([param], lr=1.0, foreach=foreach)
    optimizer.step()
    return do_bench(optimizer.step, return_mode="median")


def device_warp_size() -> int:
    """32 on NVIDIA GPUs, 64 on AMD CDNA (the configs are pruned by it)."""
    return triton.runtime.driver.active.get_current_target().warp_size


def sweep_gpu(sizes: list[int], modes: list[str], device: torch.device) -> dict[str, Any]:
    bandwidth = copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")
    rows = []
    best: dict[str, dict[str, dict[str, int]]] = {}
    jobs = [(mode, size) for mode in modes for size in sizes]
    for mode_name, n_elements in tqdm(jobs, desc="sweep", unit="size"):
        mode = aot.DTYPE_MODES[mode_name]
        buffers = Buffers(mode, n_elements, device)
        floor_bytes = mode.floor_bytes * n_elements
        timings = {}
        configs = configs_for(aot.param_dtype(mode_name), device_warp_size())
        for config in configs:
            block_size, num_warps = config.kwargs["BLOCK_SIZE"], config.num_warps
            timings[config_label(config)] = time_restored(lambda: buffers.launch(block_size, num_warps), buffers.restore)
        label, milliseconds = min(timings.items(), key=lambda item: item[1])
        bucket = str(size_bucket(n_elements))
        winner = next(c for c in configs if config_label(c) == label)
        best.setdefault(mode_name, {})[bucket] = {"BLOCK_SIZE": winner.kwargs["BLOCK_SIZE"], "num_warps": winner.num_warps}
        row: dict[str, Any] = {
            "mode": mode_name,
            "n_elements": n_elements,
            "size_bucket": int(bucket),
            "config_ms": timings,
            "best_config": label,
            "best_ms": milliseconds,
            "GBps": floor_bytes / (milliseconds * 1e-3) / 1e9,
            "pct_of_copy": 100 * floor_bytes / (milliseconds * 1e-3) / bandwidth,
        }
        if mode_name in ("fp32", "bf16", "fp16", "fp64"):
            # torch keeps its state in the param dtype; GB/s here is our floor's bytes / its time.
            for foreach in (True, False):
                torch_ms = time_torch_adadelta(mode, n_elements, device, foreach)
                key = "torch_foreach" if foreach else "torch_forloop"
                row[f"{key}_ms"] = torch_ms
                row[f"{key}_speedup"] = torch_ms / milliseconds
        rows.append(row)
        del buffers
        torch.cuda.empty_cache()
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows, "best_config_per_bucket": best}


def format_gpu_table(result: dict[str, Any]) -> str:
    header = f"{'mode':<12} {'elements':>11} {'best':<9} {'ms':>9} {'GB/s':>7} {'% copy':>6} {'vs foreach':>10} {'vs for-loop':>11}"
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        foreach = f"{row['torch_foreach_speedup']:.1f}x" if "torch_foreach_speedup" in row else "-"
        forloop = f"{row['torch_forloop_speedup']:.1f}x" if "torch_forloop_speedup" in row else "-"
        lines.append(
            f"{row['mode']:<12} {row['n_elements']:>11} {row['best_config']:<9} {row['best_ms']:>9.4f} "
            f"{row['GBps']:>7.0f} {row['pct_of_copy']:>5.0f}% {foreach:>10} {forloop:>11}"
        )
    lines.append(f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; GB/s = floor bytes / kernel time")
    return "\n".join(lines)


def plot_gpu(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    modes = sorted({row["mode"] for row in result["rows"]}, key=list(aot.DTYPE_MODES).index)
    for mode in modes:
        rows = [row for row in result["rows"] if row["mode"] == mode]
        axis.plot([r["n_elements"] for r in rows], [r["GBps"] for r in rows], marker="o", label=mode)
    fp32 = [row for row in result["rows"] if row["mode"] == "fp32" and "torch_foreach_ms" in row]
    if fp32:
        axis.plot(
            [r["n_elements"] for r in fp32],
            [28 * r["n_elements"] / (r["torch_foreach_ms"] * 1e-3) / 1e9 for r in fp32],
            linestyle=":", color="grey", label="torch foreach, fp32",
        )  # fmt: skip
    axis.axhline(result["copy_bandwidth_GBps"], color="black", linestyle="--", label="roofline: copy bandwidth")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("buffer size, elements")
    axis.set_ylabel("GB/s at the bytes floor")
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=list(aot.TARGETS), help="compile ahead of time for this target (no GPU needed)")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    parser.add_argument("--modes", nargs="*", choices=list(aot.DTYPE_MODES), default=list(aot.DTYPE_MODES))
    parser.add_argument("--min-log2", type=int, default=12, help="GPU sweep: smallest size, 2**N elements")
    parser.add_argument("--max-log2", type=int, default=28, help="GPU sweep: largest size, 2**N elements")
    parser.add_argument("--quick", action="store_true", help="GPU sweep: every other power of two")
    args = parser.parse_args(argv)

    info = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target:
        result = sweep_ahead_of_time(args.target, args.out, args.modes)
        table = format_aot_table(result)
        print(table)
        stem = f"sweep_aot_{args.target}"
        failures = [row for row in result["rows"] if not row["ok"]]
    else:
        if not torch.cuda.is_available():
            parser.error("no GPU: use --target sm_90 (or sm_80, gfx942) to compile ahead of time")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            parser.error("unset TRITON_INTERPRET to time the compiled kernel")
        step = 2 if args.quick else 1
        sizes = [2**k for k in range(args.min_log2, args.max_log2 + 1, step)]
        device = torch.device("cuda")
        result = sweep_gpu(sizes, args.modes, device)
        table = format_gpu_table(result)
        print(table)
        stem = "sweep_gpu"
        plot_gpu(result, args.out / f"{stem}.png", f"adadelta_kernel on {info['gpu']}")
        failures = []
    record = {"machine": info, **result, "table": table}
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out / (stem + '.json')}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
