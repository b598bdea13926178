"""Static checks of the GPU code, without a GPU, and the launch count of a step.

The kernel is compiled ahead of time for ``sm_90`` in every dtype mode (the config
that runs untuned, to bound CI time; ``perf/sweep.py --target`` checks every config
on every target), and with a GradScaler's ``grad_scale``/``found_inf`` in fp32. Its
PTX, Triton IR and ``ptxas -v`` are read by ``triton_adadelta.kernels.aot``, each of
the kernel's two branches on its own: the aligned one (128-bit) and the one for
unaligned pieces and tails (scalar by design).
"""

from __future__ import annotations

import pytest
import torch

import triton_adadelta
import triton_adadelta.update
from triton_adadelta.kernels import aot
from triton_adadelta.kernels.adadelta import GROUP_ROW, adadelta_kernel, default_config

TARGET = "sm_90"


def _default_job(mode: aot.DtypeMode, grad_scaler: bool = False) -> tuple:
    config = default_config(
        aot.param_dtype(mode), aot.TARGETS[TARGET].warp_size, master=mode.master, stochastic_rounding=mode.stochastic_rounding,
        compressed_state=mode.state == "bf16", quantized_state=mode.state == "u8",
    )  # fmt: skip
    return (mode.name, config.kwargs["BLOCK_SIZE"], config.num_warps, TARGET, grad_scaler)


@pytest.fixture(scope="module")
def sm90_reports() -> dict[str, aot.KernelReport]:
    # Every mode (and fp32 with a GradScaler) compiled in one go, in worker processes.
    jobs = [_default_job(mode) for mode in aot.DTYPE_MODES.values()]
    jobs.append(_default_job(aot.DTYPE_MODES["fp32"], grad_scaler=True))
    reports = [report for _, report in aot.compile_many(jobs)]
    return {report.mode + ("+grad_scaler" if report.grad_scaler else ""): report for report in reports}


@pytest.fixture(params=[*aot.DTYPE_MODES, "fp32+grad_scaler"])
def sm90_report(request, sm90_reports) -> aot.KernelReport:
    return sm90_reports[request.param]


def test_aligned_branch_streams_every_byte_in_128_bit_accesses(sm90_report: aot.KernelReport) -> None:
    report = sm90_report
    assert report.aligned.load_widths and report.aligned.store_widths, report
    assert report.aligned.all_128bit, report


def test_unaligned_branch_is_apart_and_scalar(sm90_report: aot.KernelReport) -> None:
    # The branch for unaligned pieces and tails exists on its own (its hints did not
    # leak from the aligned one, so the compiler could not merge the two), and each
    # of its accesses moves one element.
    report = sm90_report
    mode = aot.DTYPE_MODES[report.mode]
    assert report.unaligned.load_widths and report.unaligned.store_widths, report
    element_bits = {8: {"u8"}, 16: {"bf16", "fp16"}, 32: {"fp32"}, 64: {"fp64"}}
    for bits in report.unaligned.widths:
        assert {mode.param, mode.state, *(["fp32"] if mode.master else [])} & element_bits[bits], report


def test_no_spills_by_ptxas(sm90_report: aot.KernelReport) -> None:
    report = sm90_report
    assert report.spill_source == "ptxas -v"
    assert report.binary_matches, "ptxas -v must measure the cubin Triton built"
    assert report.spill_store_bytes == 0 and report.spill_load_bytes == 0, report
    assert 0 < report.registers <= 255


def test_both_branches_move_exactly_the_bytes_floor(sm90_report: aot.KernelReport) -> None:
    # Each input loaded once and each output stored once (DESIGN.md's table), in the
    # assembly and in the Triton IR, whichever branch a piece takes. 8-bit state's
    # scales count in the IR (one load and store per quant block), not in the
    # assembly, where every thread of a block reads its scale: those are 32-bit and apart.
    report = sm90_report
    mode = aot.DTYPE_MODES[report.mode]
    for branch in (report.aligned, report.unaligned):
        assert branch.bytes_per_element == mode.streamed_bytes, report
        assert branch.ir_bytes_per_element == mode.floor_bytes, report
        scale_widths = set(branch.scale_load_widths) | set(branch.scale_store_widths)
        assert scale_widths == ({32} if mode.state == "u8" else set()), report


def test_only_scalar_bookkeeping_outside_the_branches(sm90_report: aot.KernelReport) -> None:
    # Outside the two branches the kernel loads the table, the block map and the
    # hyper-parameters one value at a time, and stores nothing.
    report = sm90_report
    assert report.other_loads and max(report.other_loads) <= 64, report
    assert not report.other_stores, report
    assert report.unattributed == 0, report


def test_offsets_and_addresses_are_64_bit(sm90_report: aot.KernelReport) -> None:
    # The block index from the block map is widened before it is scaled, and every
    # address is formed from i64 offsets: a piece past 2**31 elements addresses
    # correctly, proven from the code without allocating one.
    assert sm90_report.offsets_64bit, sm90_report.offset_problems


def test_every_check_passes(sm90_report: aot.KernelReport) -> None:
    assert sm90_report.problems() == []


# The checks must be able to fail: the same readers on code with the defects.
_TTIR_BLOCK_INDEX_IN_32_BITS = """
    %c4096_i32 = arith.constant 4096 : i32
    %block = tt.addptr %entry, %c1_i32 : !tt.ptr<i32>, i32
    %block_7 = tt.load %block : !tt.ptr<i32>
    %offs = arith.muli %block_7, %c4096_i32 : i32
    %ptrs = tt.addptr %param, %offs_17 : tensor<4096x!tt.ptr<f32>>, tensor<4096xi32>
"""

_PTX_BLOCK_INDEX_IN_32_BITS = """
	ld.param.b64 	%rd38, [adadelta_kernel_param_1];
	add.s64 	%rd3, %rd38, %rd44;
	ld.global.b32 { %r1 }, [ %rd3 + 0 ];
	add.s64 	%rd4, %rd3, 4;
	ld.global.b32 { %r2 }, [ %rd4 + 0 ];
	mad.wide.s32 	%rd6, %r1, 8, %rd37;
	shl.b32 	%r3, %r2, 12;
"""


def test_the_sass_is_counted_and_follows_the_work(sm90_reports: dict[str, aot.KernelReport]) -> None:
    # The static SASS count (cuobjdump, NOPs out): 8-bit state's decoding, encoding and
    # block reductions take more instructions than fp32 state's plain loads and stores.
    counts = {mode: report.sass_instructions for mode, report in sm90_reports.items()}
    assert all(isinstance(count, int) and count > 0 for count in counts.values()), counts
    assert counts["fp32+u8state"] > counts["fp32+bf16state"] > counts["fp32"]


def test_offset_checks_fail_on_a_block_index_scaled_in_32_bits() -> None:
    # What the kernel compiles to without `.to(tl.int64)` on the block index.
    ttir = aot._ttir_offset_problems(_TTIR_BLOCK_INDEX_IN_32_BITS, 4096)
    assert any("used before it is widened" in problem for problem in ttir), ttir
    assert any("not i64" in problem for problem in ttir), ttir
    ptx = aot._ptx_offset_problems(_PTX_BLOCK_INDEX_IN_32_BITS, 1)
    assert ptx == ["PTX: the block map's int32 %r2 is used in 32 bits: shl.b32 \t%r3, %r2, 12;"]
    widened = _PTX_BLOCK_INDEX_IN_32_BITS.replace("shl.b32 \t%r3, %r2, 12;", "mul.wide.s32 \t%rd46, %r2, 4096;")
    assert aot._ptx_offset_problems(widened, 1) == []


def test_a_merged_unaligned_branch_is_reported(sm90_reports: dict[str, aot.KernelReport]) -> None:
    # What the kernel compiled to when the aligned branch's hints reached the other:
    # one branch, all 128-bit, unaligned pieces and tails included.
    report = sm90_reports["fp32"]
    merged = aot.KernelReport(**{**report.__dict__, "unaligned": aot.BranchReport(block_size=report.block_size)})
    assert any("no accesses" in problem for problem in merged.problems())
    vector = aot.BranchReport(
        load_widths={128: 4}, store_widths={128: 3}, bytes_per_element=28, block_size=report.block_size
    )
    leaked = aot.KernelReport(**{**report.__dict__, "unaligned": vector})
    assert any("a hint leaked" in problem for problem in leaked.problems())


# ------------------------------------------------------------ launches per step
def _groups(n_params: int) -> list[dict]:
    """Four param groups of many small params, in fp32 and bf16, with differing hyper-parameters."""
    torch.manual_seed(0)
    # Sizes that are not whole 16-byte vectors give every param a tail piece too.
    sizes = [5 + 7 * i for i in range(n_params)]
    params = [torch.nn.Parameter(torch.randn(size)) for size in sizes]
    halves = [torch.nn.Parameter(torch.randn(size).to(torch.bfloat16)) for size in sizes]
    quarter = n_params // 2
    return [
        {"params": params[:quarter], "lr": 0.5},
        {"params": params[quarter:], "lr": 0.1, "weight_decay": 0.01},
        {"params": halves[:quarter], "lr": 0.2, "maximize": True},
        {"params": halves[quarter:], "rho": 0.5},
    ]


def test_one_kernel_launch_per_flat_state_per_step(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    groups = _groups(40)
    optimizer = triton_adadelta.Adadelta(groups, lr=0.1)
    assert optimizer.backends() == ["triton-interpreter"]
    params = [param for group in groups for param in group["params"]]

    tables = []
    launches = []
    # The module that picks the backend calls the launcher through its global name.
    real_launcher = triton_adadelta.update.adadelta_step_
    real_run = adadelta_kernel.fn.run

    def counting_launcher(table, *args, **kwargs):
        tables.append(table)
        return real_launcher(table, *args, **kwargs)

    def counting_run(*args, **kwargs):
        launches.append((kwargs["grid"], kwargs["BLOCK_SIZE"]))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(triton_adadelta.update, "adadelta_step_", counting_launcher)
    monkeypatch.setattr(adadelta_kernel.fn, "run", counting_run)
    flat_states = optimizer.flat_states()
    assert len(flat_states) == 2  # (cpu, fp32) and (cpu, bf16), four groups between them
    steps = 2
    for step in range(steps):
        optimizer.zero_grad()
        for i, param in enumerate(params):
            # At the second step, some params have no grad: still one launch per state.
            if step == 0 or i % 3:
                param.grad = torch.ones_like(param)
        optimizer.step()
    assert len(tables) == steps * len(flat_states)
    assert len(launches) == steps * len(flat_states)
    # The first step's launches cover every param of their state, and the params of
    # both of its groups; every block of the table gets a program.
    sizes = sorted(sum(param.numel() for param in flat.params) for flat in flat_states)
    assert sorted(table.n_elements() for table in tables[: len(flat_states)]) == sizes
    for table in tables[: len(flat_states)]:
        assert len(set(table.pieces[GROUP_ROW].tolist())) == 2
    for table, (grid, block_size) in zip(tables, launches):
        blocks = sum(-(-int(numel) // block_size) for numel in table.numels)
        assert grid({"BLOCK_SIZE": block_size}) == (blocks,)
