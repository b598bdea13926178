"""The autotune sweep of ``adadelta_kernel``: on a GPU, or compiled ahead of time without one.

With a GPU (CUDA or ROCm), for a range of buffer sizes and every dtype mode: one
param (and its grad) as a one-segment table, every config ``configs_for`` keeps for
the mode and the warp size timed with ``triton.testing.do_bench``, the written
buffers (the param, reached through the table, and the state) restored before every
run (the restore is timed alone and subtracted); ``torch.optim.Adadelta`` (foreach
and for-loop, and ``torch.compile``'d) runs on the same size in the same run.
Reported: GB/s at the mode's bytes floor and % of the measured device-to-device copy
bandwidth, and per mode the worst of these over buffers of 16M elements or more
against issue 14's goals. The best config per size bucket goes to a results JSON
(machine, versions, date; rewritten after every row, so a run cut short keeps what it
measured), with a PNG of GB/s against size and the roofline. ``--offset 1`` starts the
param and grad one element into their storage, so the kernel's unaligned (scalar)
branch is what is timed. ``--device cpu`` with ``TRITON_INTERPRET=1`` runs the same
code through the interpreter with a wall-clock timer: a dry run of the plumbing, not a
measurement::

    python perf/sweep.py --out perf/results
    python perf/sweep.py --log2 24 28 --modes fp32 bf16   # some sizes and modes

Without a GPU, ``--target sm_90`` (or ``sm_80``, ``gfx942``) compiles every config
of ``AUTOTUNE_CONFIGS`` in every dtype mode ahead of time
(``triton_adadelta.kernels.aot``) and reports, for each, registers, spills by
``ptxas -v`` (AMD: the assembly's scratch size and spill counts), and for each of the
kernel's two branches the widths of the streamed global accesses and the bytes per
element; and whether offsets and addresses are 64-bit. The configs ``configs_for``
keeps must all pass (128-bit accesses in the aligned branch, no spills, the bytes
floor in both branches, 64-bit offsets); those it drops are listed apart with the
same figures, as the evidence for dropping them. Each kept kernel's ``.ptx`` and
``.cubin`` (``.amdgcn`` and ``.hsaco`` for gfx942) go under ``--out``::

    python perf/sweep.py --target sm_90 --out perf/results/sm_90
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from torch.optim.adadelta import adadelta as torch_adadelta


class NoProgress:
    """The part of tqdm's interface used here, showing nothing: for machines without tqdm."""

    def __init__(self, iterable: Any = None, **_: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def update(self, _: int = 1) -> None:
        return None


try:
    from tqdm import tqdm
except ImportError:  # optional (a GPU machine may lack it): no progress bars
    tqdm = NoProgress  # type: ignore[assignment,misc]


REPO = Path(__file__).resolve().parents[1]
# After any installed copy: an editable install maps triton_adadelta.kernels, a bare checkout cannot.
sys.path.append(str(REPO))

from machine import machine_info, write_json  # noqa: E402
from triton_adadelta.flat import hparams_table, table_for_tensors  # noqa: E402
from triton_adadelta.kernels import aot  # noqa: E402
from triton_adadelta.kernels.adadelta import (  # noqa: E402
    AUTOTUNE_CONFIGS,
    MIN_BLOCK_SIZE,
    N_HPARAMS,
    QUANT_BLOCK,
    STATE_ALIGNMENT,
    adadelta_kernel,
    configs_for,
    mode_constexprs,
    size_bucket,
    state_dtype_for,
)

_TORCH_DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64, "u8": torch.uint8,
}  # fmt: skip


def config_label(config: triton.Config) -> str:
    return f"B{config.kwargs['BLOCK_SIZE']}_w{config.num_warps}"


# ------------------------------------------------------------ ahead of time
def _branch_row(branch: aot.BranchReport) -> dict[str, Any]:
    return {
        "load_widths": branch.load_widths,
        "store_widths": branch.store_widths,
        "vector_bits": branch.vector_bits,
        "bytes_per_element": branch.bytes_per_element,
        "ir_bytes_per_element": branch.ir_bytes_per_element,
    }


def report_row(config: triton.Config, report: aot.KernelReport) -> dict[str, Any]:
    """One config of one mode: the figures of ``report``, the aligned branch's at the top level."""
    row: dict[str, Any] = {
        "mode": report.mode,
        "config": config_label(config),
        "BLOCK_SIZE": report.block_size,
        "num_warps": report.num_warps,
        "registers": report.registers,
        "spill_bytes": report.spill_bytes,
        "stack_frame_bytes": report.stack_frame_bytes,
        "spill_source": report.spill_source,
    }
    if report.spill_store_bytes is not None:
        row["spill_store_bytes"] = report.spill_store_bytes
        row["spill_load_bytes"] = report.spill_load_bytes
        row["ptxas_cubin_is_tritons"] = report.binary_matches
        row["sass_instructions"] = report.sass_instructions
    if report.vgpr_spills is not None:
        row["vgpr_spills"] = report.vgpr_spills
        row["sgpr_spills"] = report.sgpr_spills
    row.update(
        {
            # The aligned (hinted) branch: every streamed access must be 128-bit.
            "vector_bits": report.aligned.vector_bits,
            "bytes_per_element": report.aligned.bytes_per_element,
            "floor_bytes": report.floor_bytes,
            "aligned": _branch_row(report.aligned),
            # Unaligned pieces and tails: scalar by design, at the floor all the same.
            "unaligned": _branch_row(report.unaligned),
            "bookkeeping_loads": report.other_loads,
            "offsets_64bit": report.offsets_64bit,
            "problems": report.problems(),
            "ok": report.ok,
        }
    )
    return row


def _write_code(out: Path, config: triton.Config, mode: str, compiled: Any) -> None:
    directory = out / mode.replace("+", "_")
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"adadelta_{config_label(config)}"
    for key in ("ptx", "cubin", "amdgcn", "hsaco", "ttgir"):
        if key in compiled.asm:
            content = compiled.asm[key]
            path = stem.with_suffix(f".{key}")
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)


def _widths(branch: dict[str, Any]) -> list[int]:
    return sorted({int(bits) for bits in (*branch["load_widths"], *branch["store_widths"])})


def summarize(rows: list[dict[str, Any]], pruned: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures a reader wants first, over the configs that are tried."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    return {
        "configs_x_modes": len(rows),
        "all_ok": all(row["ok"] for row in rows),
        "aligned_all_128bit": all(_widths(row["aligned"]) == [128] for row in rows),
        "unaligned_widths_bits": sorted({bits for row in rows for bits in _widths(row["unaligned"])}),
        "max_spill_bytes": max((row["spill_bytes"] for row in rows), default=0),
        "max_stack_frame_bytes": max((row["stack_frame_bytes"] for row in rows), default=0),
        "max_registers": max((row["registers"] for row in rows), default=0),
        # Per mode, the distinct figures over its configs (one each when all are at the floor).
        "bytes_per_element": {
            mode: {
                branch: sorted({row[branch]["bytes_per_element"] for row in mode_rows})
                for branch in ("aligned", "unaligned")
            }
            for mode, mode_rows in by_mode.items()
        },
        "offsets_64bit": all(row["offsets_64bit"] for row in rows),
        "pruned_configs_x_modes": len(pruned),
        "pruned_spilling": sorted(f"{row['mode']} {row['config']}: {row['spill_bytes']} B" for row in pruned if row["spill_bytes"]),
    }


def sweep_ahead_of_time(target: str, out: Path, modes: list[str], workers: int | None = None) -> dict[str, Any]:
    """Compile every config of every mode for ``target``; write the kept kernels' code; return the rows.

    Returns:
        ``rows`` (the configs ``configs_for`` keeps), ``pruned`` (those it drops, with
        the same figures) and ``summary``.
    """
    warp_size = aot.TARGETS[target].warp_size
    jobs, kept = [], []
    for mode in modes:
        allowed = {config_label(c) for c in aot.mode_configs(mode, warp_size)}
        for config in AUTOTUNE_CONFIGS:
            jobs.append((mode, config))
            kept.append(config_label(config) in allowed)
    with tqdm(total=len(jobs), desc=f"compiling for {target}", unit="kernel") as bar:
        results = aot.compile_many(
            [(mode, c.kwargs["BLOCK_SIZE"], c.num_warps, target) for mode, c in jobs], workers=workers, progress=bar.update
        )
    rows, pruned = [], []
    for (mode, config), is_kept, (compiled, report) in zip(jobs, kept, results):
        if is_kept:
            _write_code(out, config, mode, compiled)
        (rows if is_kept else pruned).append(report_row(config, report))
    return {"target": target, "summary": summarize(rows, pruned), "rows": rows, "pruned": pruned}


def format_aot_table(result: dict[str, Any]) -> str:
    header = (
        f"{'mode':<12} {'config':<9} {'regs':>4} {'spill B':>7} {'stack B':>7} {'SASS':>5} {'aligned':>7} {'B/elem':>6} "
        f"{'unaligned':>9} {'B/elem':>6} {'floor':>5} {'i64':>5}  ok"
    )
    lines = [f"target {result['target']}", header, "-" * len(header)]

    def line(row: dict[str, Any]) -> str:
        unaligned = "/".join(map(str, _widths(row["unaligned"]))) or "-"
        return (
            f"{row['mode']:<12} {row['config']:<9} {row['registers']:>4} {row['spill_bytes']:>7} "
            f"{row['stack_frame_bytes']:>7} {row.get('sass_instructions') or '-':>5} "
            f"{row['aligned']['vector_bits']:>5}-b {row['aligned']['bytes_per_element']:>6} "
            f"{unaligned:>7}-b {row['unaligned']['bytes_per_element']:>6} {row['floor_bytes']:>5} "
            f"{str(row['offsets_64bit']):>5}  {'yes' if row['ok'] else 'NO'}"
        )

    lines += [line(row) for row in result["rows"]]
    if result.get("pruned"):
        lines.append(f"dropped by configs_for ({len(result['pruned'])}, not tried at run time):")
        lines += [line(row) for row in result["pruned"]]
    summary = result["summary"]
    lines.append(
        f"{summary['configs_x_modes']} configs x modes tried: all ok {summary['all_ok']}; aligned branch all 128-bit "
        f"{summary['aligned_all_128bit']}; unaligned branch {summary['unaligned_widths_bits']}-bit; max spill "
        f"{summary['max_spill_bytes']} B; max registers {summary['max_registers']}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------- GPU
class Buffers:
    """One param of a dtype mode, its grad and its flat state on the GPU, as a one-segment table.

    Args:
        mode: the dtype mode.
        n_elements: the param's size.
        device: where the buffers live.
        offset: elements the param and grad start into their storage: 0 gives the
            kernel's aligned (128-bit) branch, 1 its unaligned (scalar) branch.

    ``written`` are the buffers a launch writes (the param, reached through the
    table's address, and the state); ``restore`` puts back the copies in ``saved``.
    """

    def __init__(self, mode: aot.DtypeMode, n_elements: int, device: torch.device, offset: int = 0) -> None:
        param_dtype = _TORCH_DTYPES[mode.param]
        compute_dtype = state_dtype_for(param_dtype)
        state_dtype = _TORCH_DTYPES[mode.state]
        generator = torch.Generator(device=device).manual_seed(0)

        def storage(dtype: torch.dtype) -> torch.Tensor:
            return torch.randn(offset + n_elements, device=device, dtype=dtype, generator=generator)[offset:]

        self.mode = mode
        self.n_elements = n_elements
        self.param = storage(param_dtype)
        self.grad = storage(param_dtype)
        # 8-bit state: codes (random) and one power-of-two scale per quant block, padded
        # to whole blocks, and a table whose pieces start on them.
        quantized = state_dtype == torch.uint8
        alignment = QUANT_BLOCK if quantized else STATE_ALIGNMENT
        n_state = -(-n_elements // QUANT_BLOCK) * QUANT_BLOCK if quantized else n_elements
        self.scales: dict[str, torch.Tensor] = {}
        if quantized:
            self.square_avg = torch.randint(0, 256, (n_state,), device=device, dtype=torch.uint8, generator=generator)
            self.acc_delta = torch.randint(0, 256, (n_state,), device=device, dtype=torch.uint8, generator=generator)
            for name in ("square_avg_scale_ptr", "acc_delta_scale_ptr"):
                exponents = torch.randint(-20, 0, (n_state // QUANT_BLOCK,), device=device, generator=generator)
                self.scales[name] = torch.exp2(exponents.float())
        else:
            self.square_avg = torch.rand(n_elements, device=device, dtype=state_dtype, generator=generator)
            self.acc_delta = torch.rand(n_elements, device=device, dtype=state_dtype, generator=generator) * 1e-3
        self.master = None
        if mode.master:
            self.master = torch.zeros(n_state, device=device)
            self.master[:n_elements] = self.param.float()
        self.table, _ = table_for_tensors([self.param], [self.grad], alignment=alignment)
        self.hparams = hparams_table(((1.0, 0.9, 1e-6, 0.0, False),), compute_dtype, device)
        self.written = [self.param, self.square_avg, self.acc_delta] + ([self.master] if mode.master else [])
        self.written += list(self.scales.values())
        self.saved = [tensor.clone() for tensor in self.written]

    def restore(self) -> None:
        for tensor, saved in zip(self.written, self.saved):
            tensor.copy_(saved)

    def launch(self, block_size: int, num_warps: int) -> None:
        """One launch of the kernel with this config (as ``adadelta_step_`` launches it, untuned)."""
        block_map, map_starts, programs = self.table.block_map()
        param_dtype = self.table.param_dtype
        adadelta_kernel.fn[(programs[block_size],)](
            table_ptr=self.table.pieces,
            block_map_ptr=block_map,
            map_starts_ptr=map_starts,
            square_avg_ptr=self.square_avg,
            acc_delta_ptr=self.acc_delta,
            master_ptr=self.master,
            square_avg_scale_ptr=self.scales.get("square_avg_scale_ptr"),
            acc_delta_scale_ptr=self.scales.get("acc_delta_scale_ptr"),
            hparams_ptr=self.hparams,
            grad_scale_ptr=None,
            found_inf_ptr=None,
            seed=1234,
            n_pieces=self.table.n_pieces,
            size_bucket=size_bucket(self.n_elements),
            **mode_constexprs(
                param_dtype, master=self.master is not None, stochastic_rounding=self.mode.stochastic_rounding
            ),
            HAS_GRAD_SCALE=False,
            HAS_FOUND_INF=False,
            N_HPARAMS=N_HPARAMS,
            MIN_BLOCK_SIZE=MIN_BLOCK_SIZE,
            enable_fp_fusion=False,
            BLOCK_SIZE=block_size,
            num_warps=num_warps,
        )


def bench_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` (CUDA events) on a GPU; on the
    CPU, for the interpreter dry run, the wall-clock median of three calls after one."""
    if device.type != "cpu":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_restored(launch: Callable[[], None], restore: Callable[[], None], restore_ms: float, device: torch.device) -> float:
    """Median ms of ``launch`` alone: the median of restore+launch minus ``restore_ms``."""
    both = bench_ms(lambda: (restore(), launch()), device)
    return max(both - restore_ms, 1e-6)


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), by ``copy_`` of ``n_bytes``."""
    source = torch.empty(n_bytes // 4, device=device)
    target = torch.empty_like(source)
    milliseconds = bench_ms(lambda: target.copy_(source), device)
    return 2 * n_bytes / (milliseconds * 1e-3)


def time_torch_adadelta(mode: aot.DtypeMode, n_elements: int, device: torch.device, foreach: bool) -> float:
    """Median ms of one torch.optim.Adadelta step on one param of the mode's dtype."""
    param = torch.nn.Parameter(torch.randn(n_elements, device=device, dtype=_TORCH_DTYPES[mode.param]))
    param.grad = torch.randn_like(param)
    optimizer = torch.optim.Adadelta([param], lr=1.0, foreach=foreach)
    optimizer.step()
    return bench_ms(optimizer.step, device)


def _torch_adadelta_step(params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor],
                         acc_deltas: list[torch.Tensor], steps: list[torch.Tensor]) -> None:  # fmt: skip
    """torch's own Adadelta update (what ``torch.optim.Adadelta.step`` runs), to be compiled.

    On a GPU the step counts live on the params' device (``capturable``), so the
    compiled graph has no CPU part (torch allows ``capturable`` on accelerators only).
    """
    torch_adadelta(
        params, grads, square_avgs, acc_deltas, steps, capturable=steps[0].device.type != "cpu", foreach=False,
        lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False,
    )  # fmt: skip


# One compiled function for every row: with dynamic shapes a new size is no new
# compile (dynamo stops compiling a function after 8 recompiles and runs it eagerly).
_compiled_torch_step: Callable[..., None] | None = None
# Why torch.compile failed, once it has: later rows report it without trying again.
_compiled_torch_error: str | None = None


def time_torch_compiled(mode: aot.DtypeMode, n_elements: int, device: torch.device) -> tuple[float, float]:
    """``torch.compile``'d torch Adadelta on one param of the mode's dtype.

    Returns:
        The median ms of a step, and the seconds its first call took (the compile).
    """
    global _compiled_torch_step
    if _compiled_torch_step is None:
        _compiled_torch_step = torch.compile(_torch_adadelta_step, dynamic=True, fullgraph=True)
    dtype = _TORCH_DTYPES[mode.param]
    params = [torch.randn(n_elements, device=device, dtype=dtype)]
    buffers = (params, [torch.randn_like(params[0])], [torch.zeros_like(params[0])], [torch.zeros_like(params[0])],
               [torch.zeros((), device=device, dtype=torch.float32)])  # fmt: skip
    start = time.perf_counter()
    _compiled_torch_step(*buffers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start
    return bench_ms(lambda: _compiled_torch_step(*buffers), device), compile_s


def device_warp_size(device: torch.device) -> int:
    """32 on NVIDIA GPUs (and in the interpreter, which runs NVIDIA's configs), 64 on AMD CDNA."""
    if device.type == "cpu":
        return 32
    return triton.runtime.driver.active.get_current_target().warp_size


def _torch_baselines(mode: aot.DtypeMode, n_elements: int, device: torch.device, milliseconds: float,
                     compiled: bool) -> dict[str, Any]:  # fmt: skip
    """torch's Adadelta on the same size: foreach, for-loop and compiled; times and our speed-ups."""
    row: dict[str, Any] = {}
    for foreach in (True, False):
        torch_ms = time_torch_adadelta(mode, n_elements, device, foreach)
        key = "torch_foreach" if foreach else "torch_forloop"
        row[f"{key}_ms"] = torch_ms
        row[f"{key}_speedup"] = torch_ms / milliseconds
    global _compiled_torch_error
    if compiled and _compiled_torch_error is not None:
        row["torch_compiled_error"] = _compiled_torch_error  # tried once: each try costs a compile
    elif compiled:
        try:
            torch_ms, compile_s = time_torch_compiled(mode, n_elements, device)
        except Exception as error:  # noqa: BLE001 - a compiler failure is a result to report, not a crash
            traceback.print_exc()
            _compiled_torch_error = row["torch_compiled_error"] = f"{type(error).__name__}: {error}"[:500]
        else:
            row["torch_compiled_ms"] = torch_ms
            row["torch_compiled_speedup"] = torch_ms / milliseconds
            row["torch_compiled_first_call_s"] = compile_s
    return row


def sweep_gpu(
    sizes: list[int],
    modes: list[str],
    device: torch.device,
    offset: int = 0,
    *,
    compiled_torch: bool = True,
    copy_bytes: int = 1 << 30,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    all_configs: bool = False,
) -> dict[str, Any]:
    """Time every config of every mode on every size, beside torch's Adadelta.

    Sizes run largest first, every mode at each size, so a run cut short keeps the
    sizes the goals are judged on. ``on_row`` gets the result so far after each row.
    ``all_configs``: also time the configs ``configs_for`` drops (its rules' cost); a
    row's best config, GB/s and % of copy stay those of the configs it keeps, what
    the autotuner chooses from, and ``best_any_*`` say the best of all.
    """
    bandwidth = copy_bandwidth(device, copy_bytes)
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s")
    result: dict[str, Any] = {"copy_bandwidth_GBps": bandwidth / 1e9, "offset": offset, "rows": [], "best_config_per_bucket": {}}
    jobs = [(mode, size) for size in sorted(sizes, reverse=True) for mode in modes]
    for mode_name, n_elements in tqdm(jobs, desc="sweep", unit="size"):
        mode = aot.DTYPE_MODES[mode_name]
        buffers = Buffers(mode, n_elements, device, offset)
        floor_bytes = mode.floor_bytes * n_elements
        configs = aot.mode_configs(mode, device_warp_size(device))
        kept_labels = [config_label(config) for config in configs]
        restore_ms = bench_ms(buffers.restore, device)
        timings = {}
        for config in AUTOTUNE_CONFIGS if all_configs else configs:
            block_size, num_warps = config.kwargs["BLOCK_SIZE"], config.num_warps
            launch = lambda: buffers.launch(block_size, num_warps)  # noqa: E731
            timings[config_label(config)] = time_restored(launch, buffers.restore, restore_ms, device)
        label, milliseconds = min(((label, timings[label]) for label in kept_labels), key=lambda item: item[1])
        bucket = str(size_bucket(n_elements))
        winner = next(c for c in configs if config_label(c) == label)
        best = result["best_config_per_bucket"].setdefault(mode_name, {})
        best[bucket] = {"BLOCK_SIZE": winner.kwargs["BLOCK_SIZE"], "num_warps": winner.num_warps}
        row: dict[str, Any] = {
            "mode": mode_name,
            "n_elements": n_elements,
            "size_bucket": int(bucket),
            "config_ms": timings,
            "restore_ms": restore_ms,
            "best_config": label,
            "best_ms": milliseconds,
            "GBps": floor_bytes / (milliseconds * 1e-3) / 1e9,
            "pct_of_copy": 100 * floor_bytes / (milliseconds * 1e-3) / bandwidth,
        }
        if all_configs:
            any_label, any_ms = min(timings.items(), key=lambda item: item[1])
            row.update({"kept_configs": kept_labels, "best_any_config": any_label, "best_any_ms": any_ms,
                        "best_any_pct_of_copy": 100 * floor_bytes / (any_ms * 1e-3) / bandwidth})  # fmt: skip
        del buffers
        if mode_name in ("fp32", "bf16", "fp16", "fp64"):
            # torch keeps its state in the param dtype; GB/s here is our floor's bytes / its time.
            row.update(_torch_baselines(mode, n_elements, device, milliseconds, compiled_torch))
        result["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_row is not None:
            on_row(result)
    return result


# The goals of issue 14, judged on buffers of at least 16M elements.
GOAL_MIN_ELEMENTS = 1 << 24
GOAL_PCT_OF_COPY = 90.0
GOAL_SPEEDUP_VS_FOREACH = 3.0


def summarize_gpu(result: dict[str, Any]) -> dict[str, Any]:
    """Per mode, the worst figures over the sizes the goals are judged on, and whether each goal is met.

    Returns:
        ``{mode: {"min_pct_of_copy", "min_speedup_vs_foreach", ...}}`` over the rows of
        at least ``GOAL_MIN_ELEMENTS``, and ``goals_met`` (None when no row is that large).
    """
    by_mode: dict[str, Any] = {}
    for row in result["rows"]:
        if row["n_elements"] < GOAL_MIN_ELEMENTS:
            continue
        figures = by_mode.setdefault(row["mode"], {"sizes": []})
        figures["sizes"].append(row["n_elements"])
        for key, source in (("min_pct_of_copy", "pct_of_copy"), ("min_GBps", "GBps"),
                            ("min_speedup_vs_foreach", "torch_foreach_speedup"),
                            ("min_speedup_vs_forloop", "torch_forloop_speedup"),
                            ("min_speedup_vs_compiled", "torch_compiled_speedup")):  # fmt: skip
            if source in row:
                figures[key] = min(figures.get(key, float("inf")), row[source])
    goals_met = None
    if by_mode:
        copy_met = all(figures["min_pct_of_copy"] >= GOAL_PCT_OF_COPY for figures in by_mode.values())
        foreach = [figures["min_speedup_vs_foreach"] for figures in by_mode.values() if "min_speedup_vs_foreach" in figures]
        goals_met = {
            f"pct_of_copy>={GOAL_PCT_OF_COPY:.0f}": copy_met,
            f"speedup_vs_foreach>={GOAL_SPEEDUP_VS_FOREACH:.0f}": bool(foreach) and min(foreach) >= GOAL_SPEEDUP_VS_FOREACH,
        }
    return {"min_elements": GOAL_MIN_ELEMENTS, "by_mode": by_mode, "goals_met": goals_met}


def format_gpu_table(result: dict[str, Any]) -> str:
    header = (
        f"{'mode':<12} {'elements':>11} {'best':<9} {'ms':>9} {'GB/s':>7} {'% copy':>6} "
        f"{'vs foreach':>10} {'vs for-loop':>11} {'vs compiled':>11}"
    )
    lines = [header, "-" * len(header)]

    def speedup(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f}x" if key in row else "-"

    for row in result["rows"]:
        lines.append(
            f"{row['mode']:<12} {row['n_elements']:>11} {row['best_config']:<9} {row['best_ms']:>9.4f} "
            f"{row['GBps']:>7.0f} {row['pct_of_copy']:>5.0f}% {speedup(row, 'torch_foreach_speedup'):>10} "
            f"{speedup(row, 'torch_forloop_speedup'):>11} {speedup(row, 'torch_compiled_speedup'):>11}"
        )
    lines.append(f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; GB/s = floor bytes / kernel time")
    every = [row for row in result["rows"] if "best_any_config" in row]
    if every:
        lines.append("every config (--all-configs), % of copy; * = kept by configs_for:")
        for row in every:
            floor_ms = row["best_ms"] * row["pct_of_copy"] / 100  # the copy's time for the floor's bytes
            timed = "  ".join(f"{label}{'*' if label in row['kept_configs'] else ''} {100 * floor_ms / ms:.0f}%"
                              for label, ms in row["config_ms"].items())  # fmt: skip
            lines.append(f"  {row['mode']} {row['n_elements']}: {timed}")
    return "\n".join(lines)


def plot_gpu(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    modes = sorted({row["mode"] for row in result["rows"]}, key=list(aot.DTYPE_MODES).index)
    for mode in modes:
        rows = sorted((row for row in result["rows"] if row["mode"] == mode), key=lambda row: row["n_elements"])
        axis.plot([r["n_elements"] for r in rows], [r["GBps"] for r in rows], marker="o", label=mode)
    fp32 = sorted((row for row in result["rows"] if row["mode"] == "fp32"), key=lambda row: row["n_elements"])
    for key, style, label in (("torch_foreach_ms", ":", "torch foreach, fp32"),
                              ("torch_compiled_ms", "-.", "torch.compile'd torch, fp32")):  # fmt: skip
        rows = [row for row in fp32 if key in row]
        if rows:
            # torch's own traffic is larger: this is our floor's bytes over its time.
            axis.plot([r["n_elements"] for r in rows], [28 * r["n_elements"] / (r[key] * 1e-3) / 1e9 for r in rows],
                      linestyle=style, color="grey", label=label)  # fmt: skip
    axis.axhline(result["copy_bandwidth_GBps"], color="black", linestyle="--", label="roofline: copy bandwidth")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("buffer size, elements")
    axis.set_ylabel("GB/s at the bytes floor")
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _sweep_on_device(args: argparse.Namespace, parser: argparse.ArgumentParser, info: dict[str, Any]) -> None:
    """The timed sweep (``--device``): writes the JSON after every row and the plot at the end."""
    device = torch.device(args.device)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cpu" and not interpreted:
        parser.error("--device cpu is the interpreter dry run: set TRITON_INTERPRET=1")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU: use --target sm_90 (or sm_80, gfx942) to compile ahead of time")
    if device.type == "cuda" and interpreted:
        parser.error("unset TRITON_INTERPRET to time the compiled kernel")
    if args.log2:
        sizes = [2**k for k in args.log2]
    else:
        sizes = [2**k for k in range(args.min_log2, args.max_log2 + 1, 2 if args.quick else 1)]
    stem = ("sweep_gpu" if device.type == "cuda" else "sweep_cpu_interpreter") + (f"_offset{args.offset}" if args.offset else "")
    stem += "_all_configs" if args.all_configs else ""
    path = args.out / f"{stem}.json"
    run = {"device": str(device), "interpreter_dry_run": interpreted, "sizes": sizes, "modes": args.modes}

    def save(partial: dict[str, Any], complete: bool = False) -> None:
        write_json(path, {"machine": info, **run, "complete": complete, **partial, "summary": summarize_gpu(partial)})

    result = sweep_gpu(sizes, args.modes, device, args.offset, compiled_torch=not args.no_compiled_torch,
                       copy_bytes=args.copy_mib << 20, on_row=save, all_configs=args.all_configs)  # fmt: skip
    table = format_gpu_table(result)
    print(table)
    result["table"] = table
    save(result, complete=True)
    name = info.get("gpu", "the CPU (interpreter dry run: not a measurement)")
    try:
        plot_gpu(result, args.out / f"{stem}.png", f"adadelta_kernel on {name}")
    except ImportError as error:
        print(f"plot skipped: {error.name} not installed")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=list(aot.TARGETS), help="compile ahead of time for this target (no GPU needed)")
    parser.add_argument("--device", default="cuda", help="timed sweep: cuda, or cpu for an interpreter dry run (TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    parser.add_argument("--modes", nargs="*", choices=list(aot.DTYPE_MODES), default=list(aot.DTYPE_MODES))
    parser.add_argument("--min-log2", type=int, default=12, help="GPU sweep: smallest size, 2**N elements")
    parser.add_argument("--max-log2", type=int, default=28, help="GPU sweep: largest size, 2**N elements")
    parser.add_argument("--quick", action="store_true", help="GPU sweep: every other power of two")
    parser.add_argument("--log2", type=int, nargs="*", help="GPU sweep: exactly these sizes, 2**N elements (overrides the range)")
    parser.add_argument(
        "--offset", type=int, default=0, help="GPU sweep: param/grad start N elements into their storage (1: unaligned branch)"
    )
    parser.add_argument("--copy-mib", type=int, default=1024, help="GPU sweep: MiB copied to measure the copy bandwidth")
    parser.add_argument("--no-compiled-torch", action="store_true", help="GPU sweep: skip the torch.compile'd baseline")
    parser.add_argument("--all-configs", action="store_true",
                        help="GPU sweep: also time the configs configs_for drops (rows keep the kept configs' best; "
                             "best_any_* the best of all); writes sweep_gpu_all_configs.json")
    parser.add_argument("--jobs", type=int, default=None, help="--target: compiling processes (default: one per CPU)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.target:
        info = machine_info(torch.device(args.device))
        _sweep_on_device(args, parser, info)
        return 0
    info = machine_info()
    result = sweep_ahead_of_time(args.target, args.out, args.modes, args.jobs)
    table = format_aot_table(result)
    print(table)
    stem = f"sweep_aot_{args.target}"
    write_json(args.out / f"{stem}.json", {"machine": info, **result, "table": table})
    print(f"wrote {args.out / (stem + '.json')}")
    return 1 if any(not row["ok"] for row in result["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
