"""Ahead-of-time compilation of ``adadelta_kernel`` for GPUs this machine does not have.

``triton.compile`` builds the kernel for ``sm_80``, ``sm_90`` (NVIDIA) or ``gfx942``
(AMD MI300) without a driver, and :func:`inspect_kernel` reads the result.

The kernel has two branches, and each is judged on its own:

* the *aligned* branch (pieces whose param and grad are 16-byte aligned, with
  ``tl.multiple_of`` hints): every streamed load and store must be 128-bit;
* the *unaligned* branch (unaligned pieces and short tails, no hints): scalar by
  design. It is reported apart and not counted against the 128-bit claim, but it
  must stay scalar: a vector access there means a hint leaked into it.

A load or store of the assembly belongs to a branch by its debug location: the line
of the ``_update_block`` call it was inlined from (PTX ``.loc ... inlined_at``, the
AMD ``.loc`` comments' ``@[ file:line ]``). Everything else the kernel loads (the
segment table, the block map, the hyper-parameters, ``grad_scale``, ``found_inf``)
is scalar bookkeeping, counted apart and not streamed; the kernel stores nothing
outside the two branches.

What is read:

* registers and spills. NVIDIA: ``ptxas -v`` (bytes of stack frame, spill stores
  and spill loads), run on the PTX with the flags Triton's own build uses; the
  cubin it writes is compared byte for byte with Triton's, so the figures are
  those of the binary that runs. (cuobjdump's ``LOCAL`` column is not used: it read
  0 for configs where ``ptxas -v`` reported 1056 B of spills.) AMD: the assembly's
  metadata (``ScratchSize``, ``.vgpr_spill_count``, ``.sgpr_spill_count``);
* the width of each branch's streamed accesses, from the PTX / AMD assembly;
* each branch's bytes per element: the bits its accesses move per thread, times
  the threads, over ``BLOCK_SIZE``; and, from the Triton IR, the bytes of the
  tensor loads and stores of the branch's region over ``BLOCK_SIZE`` (the unaligned
  branch works in unrolled sub-blocks). Both must equal DESIGN.md's floor;
* 64-bit offsets and addresses: in the Triton IR, the block index (an int32 from
  the block map) is sign-extended to i64 before anything else uses it, ``block *
  BLOCK_SIZE`` is an i64 multiply, and every tensor of addresses is formed from
  i64 offsets; in the PTX, every int32 loaded from the block map is consumed by a
  widening instruction only.

The pointer arguments (table, block map, state, hyper-parameters, ``grad_scale``,
``found_inf``) carry ``tt.divisibility=16``, as the JIT gives 16-byte-aligned
tensors at run time. Params and grads are not arguments: their alignment comes
from the in-kernel hints. FMA contraction is off, as at launch.
"""

from __future__ import annotations

import ast
import inspect
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import adadelta
from .adadelta import adadelta_kernel

__all__ = [
    "DTYPE_MODES",
    "TARGETS",
    "BranchReport",
    "DtypeMode",
    "KernelReport",
    "compile_and_inspect",
    "compile_kernel",
    "compile_many",
    "inspect_kernel",
    "mode_configs",
]


@dataclass(frozen=True)
class DtypeMode:
    """One way the optimizer stores a buffer (DESIGN.md, "Dtype modes").

    Args:
        name: short label, e.g. ``"bf16+master"``.
        param: Triton type of params and grads (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"``).
        state: Triton type of ``square_avg`` and ``acc_delta`` (``"bf16"``: compressed
            state; ``"u8"``: 8-bit codes with one fp32 scale per ``QUANT_BLOCK``; the
            hyper-parameters and the math are fp32, fp64 for fp64 params).
        master: an fp32 master copy is read and written.
        stochastic_rounding: the param store rounds stochastically.
        floor_bytes: bytes per element the kernel must move (DESIGN.md's floor), 8-bit
            state's scales included (``scale_bytes``).
    """

    name: str
    param: str
    state: str
    master: bool
    stochastic_rounding: bool
    floor_bytes: float

    @property
    def scale_bytes(self) -> float:
        """8-bit state's scales, per element: two buffers' fp32 scale per quant block,
        each read and written."""
        return 2 * 2 * 4 / adadelta.QUANT_BLOCK if self.state == "u8" else 0

    @property
    def streamed_bytes(self) -> float:
        """The floor less the scales: what the per-element accesses move."""
        return self.floor_bytes - self.scale_bytes


DTYPE_MODES: dict[str, DtypeMode] = {
    mode.name: mode
    for mode in (
        DtypeMode("fp32", "fp32", "fp32", False, False, 28),
        DtypeMode("bf16", "bf16", "fp32", False, False, 22),
        DtypeMode("fp16", "fp16", "fp32", False, False, 22),
        DtypeMode("bf16+master", "bf16", "fp32", True, False, 28),
        DtypeMode("fp16+master", "fp16", "fp32", True, False, 28),
        DtypeMode("bf16+sr", "bf16", "fp32", False, True, 22),
        DtypeMode("fp16+sr", "fp16", "fp32", False, True, 22),
        DtypeMode("fp64", "fp64", "fp64", False, False, 56),
        # bf16 state (state_dtype=torch.bfloat16): 4 B of state read and written, not 8.
        DtypeMode("fp32+bf16state", "fp32", "bf16", False, False, 20),
        DtypeMode("bf16+bf16state", "bf16", "bf16", False, False, 14),
        DtypeMode("bf16+master+bf16state", "bf16", "bf16", True, False, 20),
        DtypeMode("bf16+sr+bf16state", "bf16", "bf16", False, True, 14),
        # 8-bit state (state_dtype=torch.uint8): 2 B of codes read and written, and
        # 4 fp32 scale accesses per 256 elements.
        DtypeMode("fp32+u8state", "fp32", "u8", False, False, 16.0625),
        DtypeMode("bf16+u8state", "bf16", "u8", False, False, 10.0625),
        DtypeMode("bf16+master+u8state", "bf16", "u8", True, False, 16.0625),
        DtypeMode("bf16+sr+u8state", "bf16", "u8", False, True, 10.0625),
    )
}

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_BITS = {"fp64": 64, "fp32": 32, "bf16": 16, "fp16": 16, "u8": 8}


def param_dtype(mode: DtypeMode | str) -> torch.dtype:
    """The torch dtype of a mode's params."""
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    return _TORCH_DTYPES[mode.param]


def mode_configs(mode: DtypeMode | str, warp_size: int) -> list[triton.Config]:
    """The autotune configs a mode tries (``configs_for``)."""
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    return adadelta.configs_for(
        param_dtype(mode), warp_size, master=mode.master, stochastic_rounding=mode.stochastic_rounding,
        compressed_state=mode.state == "bf16", quantized_state=mode.state == "u8",
    )  # fmt: skip


TARGETS: dict[str, GPUTarget] = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}

_ELEMENT_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1}

# One compile: (mode, BLOCK_SIZE, num_warps, target) and, optionally, grad_scaler.
Job = tuple  # (str, int, int, str) or (str, int, int, str, bool)


@dataclass
class BranchReport:
    """The streamed loads and stores of one branch of the kernel.

    Args:
        load_widths, store_widths: accesses per thread in the assembly, ``{bits: count}``.
        bytes_per_element: the bytes those accesses move per thread, times the
            threads, over ``BLOCK_SIZE``.
        ir_loads, ir_stores: the tensor loads and stores of the branch's region in
            the Triton IR, as ``"f32[4096]"`` (element type and length).
        block_size: the elements of a block, which the branch's accesses must cover.
        scale_load_widths, scale_store_widths: 8-bit state's scale accesses per thread,
            ``{bits: count}``, apart: every thread of a quant block reads its scale, so
            they are not the bytes moved (the IR's accesses are).
    """

    load_widths: dict[int, int] = field(default_factory=dict)
    store_widths: dict[int, int] = field(default_factory=dict)
    scale_load_widths: dict[int, int] = field(default_factory=dict)
    scale_store_widths: dict[int, int] = field(default_factory=dict)
    bytes_per_element: float = 0.0
    ir_loads: list[str] = field(default_factory=list)
    ir_stores: list[str] = field(default_factory=list)
    block_size: int = 1

    @property
    def ir_bytes_per_element(self) -> float:
        total = 0
        for access in self.ir_loads + self.ir_stores:
            element, length = re.fullmatch(r"(\w+)\[(\d+)\]", access).groups()
            total += _ELEMENT_BYTES[element] * int(length)
        per_element = total / self.block_size
        return int(per_element) if per_element.is_integer() else per_element

    @property
    def widths(self) -> set[int]:
        return set(self.load_widths) | set(self.store_widths)

    @property
    def vector_bits(self) -> int:
        """The narrowest access (0: none)."""
        return min(self.widths, default=0)

    @property
    def all_128bit(self) -> bool:
        return self.widths == {128}


@dataclass
class KernelReport:
    """What one compiled kernel does, read from its IR, assembly and binary.

    ``spill_bytes`` is ``ptxas -v``'s spill stores plus spill loads (NVIDIA), or the
    scratch bytes per lane (AMD, where spills go). ``stack_frame_bytes`` is reported
    beside it (ptxas's stack frame; the AMD private segment).
    """

    mode: str
    target: str
    block_size: int
    num_warps: int
    grad_scaler: bool
    registers: int
    spill_bytes: int
    stack_frame_bytes: int
    spill_source: str
    aligned: BranchReport
    unaligned: BranchReport
    floor_bytes: int
    # NVIDIA (ptxas -v): bytes of spill stores and loads; None on AMD.
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    # AMD: registers spilled (counts); None on NVIDIA.
    vgpr_spills: int | None = None
    sgpr_spills: int | None = None
    # Whether the cubin ptxas -v built is Triton's, byte for byte (None on AMD).
    binary_matches: bool | None = None
    # NVIDIA: instructions in the cubin's SASS (cuobjdump -sass, NOPs left out): both
    # branches and the slow paths of division and square root, so a static count, not
    # the instructions an element costs; None on AMD or without cuobjdump.
    sass_instructions: int | None = None
    # Bookkeeping accesses (table, block map, hyper-parameters, ...): {bits: count}.
    other_loads: dict[int, int] = field(default_factory=dict)
    other_stores: dict[int, int] = field(default_factory=dict)
    # Accesses with no debug location that names a branch or the kernel body.
    unattributed: int = 0
    offset_problems: list[str] = field(default_factory=list)

    @property
    def offsets_64bit(self) -> bool:
        return not self.offset_problems

    @property
    def at_floor(self) -> bool:
        streamed = DTYPE_MODES[self.mode].streamed_bytes
        return all(
            branch.bytes_per_element == streamed and branch.ir_bytes_per_element == self.floor_bytes
            for branch in (self.aligned, self.unaligned)
        )

    def problems(self) -> list[str]:
        """Every way this kernel falls short of DESIGN.md's claims (empty: none)."""
        mode = DTYPE_MODES[self.mode]
        found = []
        if not self.aligned.all_128bit:
            found.append(
                f"aligned branch: not every streamed access is 128-bit "
                f"(loads {self.aligned.load_widths}, stores {self.aligned.store_widths})"
            )
        if not self.unaligned.widths:
            found.append("unaligned branch: no accesses (merged into the aligned one?)")
        scalar = {_BITS[mode.param], _BITS[mode.state]} | ({32} if mode.master else set())
        if self.unaligned.widths - scalar:
            found.append(
                f"unaligned branch: vector accesses (a hint leaked into it): "
                f"loads {self.unaligned.load_widths}, stores {self.unaligned.store_widths}"
            )
        for name, branch in (("aligned", self.aligned), ("unaligned", self.unaligned)):
            if branch.bytes_per_element != mode.streamed_bytes:
                found.append(
                    f"{name} branch: {branch.bytes_per_element} B/element in the assembly, floor {mode.streamed_bytes}"
                    + (" (scales apart)" if mode.scale_bytes else "")
                )
            scale_widths = set(branch.scale_load_widths) | set(branch.scale_store_widths)
            if (mode.state == "u8") != bool(scale_widths) or scale_widths - {32}:
                found.append(
                    f"{name} branch: scale accesses {branch.scale_load_widths} / {branch.scale_store_widths}, "
                    f"{'32-bit ones' if mode.state == 'u8' else 'none'} expected"
                )
            if branch.ir_bytes_per_element != self.floor_bytes:
                found.append(
                    f"{name} branch: {branch.ir_bytes_per_element} B/element in the Triton IR "
                    f"(loads {branch.ir_loads}, stores {branch.ir_stores}), floor {self.floor_bytes}"
                )
        # A stack frame alone is not a spill: fp64 division's slow-path subroutine
        # can reserve one (8 B on sm_80) with no local load or store in the SASS.
        if self.spill_bytes or self.vgpr_spills or self.sgpr_spills:
            found.append(
                f"spills ({self.spill_source}): {self.spill_bytes} B spilled, stack frame {self.stack_frame_bytes} B"
            )
        if self.binary_matches is False:
            found.append("ptxas -v built a different cubin from Triton's: its figures are not the kernel's")
        if self.other_stores:
            found.append(f"stores outside the two branches: {self.other_stores}")
        if self.unattributed:
            found.append(f"{self.unattributed} accesses with no debug location naming a branch")
        found += self.offset_problems
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


# ------------------------------------------------------------------ compiling
def _interpreted() -> bool:
    """Whether ``@triton.jit`` made interpreter functions (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(adadelta_kernel.fn, JITFunction)


@dataclass
class CompiledAsm:
    """The ``.asm`` of a kernel compiled in another process."""

    asm: dict[str, Any]


def _kernel_python_function() -> Callable[..., Any]:
    fn: Any = adadelta_kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _arg_names() -> list[str]:
    return list(inspect.signature(_kernel_python_function()).parameters)


def _signature(mode: DtypeMode, grad_scaler: bool = False) -> dict[str, str]:
    """Types of the kernel's runtime arguments, as the launcher passes them.

    A ``None`` argument (no master copy, no GradScaler) is a constexpr ``None`` at
    run time, and is left out here (see :func:`_constants`).
    """
    state = f"*{mode.state}"
    signature = {
        "table_ptr": "*i64", "block_map_ptr": "*i32", "map_starts_ptr": "*i64",
        "square_avg_ptr": state, "acc_delta_ptr": state, "master_ptr": "*fp32",
        "square_avg_scale_ptr": "*fp32", "acc_delta_scale_ptr": "*fp32",
        "hparams_ptr": "*fp64" if mode.param == "fp64" else "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
        "seed": "i32", "n_pieces": "i32", "size_bucket": "i32",
    }  # fmt: skip
    if not mode.master:
        del signature["master_ptr"]
    if mode.state != "u8":
        del signature["square_avg_scale_ptr"], signature["acc_delta_scale_ptr"]
    if not grad_scaler:
        del signature["grad_scale_ptr"], signature["found_inf_ptr"]
    return signature


def _constants(mode: DtypeMode, block_size: int, grad_scaler: bool) -> dict[str, Any]:
    """The constexprs of a launch (``adadelta_step_``) of this mode and config."""
    dtype = _TORCH_DTYPES[mode.param]
    constants: dict[str, Any] = {
        **adadelta.mode_constexprs(dtype, master=mode.master, stochastic_rounding=mode.stochastic_rounding),
        "HAS_GRAD_SCALE": grad_scaler,
        "HAS_FOUND_INF": grad_scaler,
        "N_HPARAMS": adadelta.N_HPARAMS,
        "MIN_BLOCK_SIZE": adadelta.MIN_BLOCK_SIZE,
        "BLOCK_SIZE": block_size,
    }
    if not mode.master:
        constants["master_ptr"] = None
    if mode.state != "u8":
        constants["square_avg_scale_ptr"] = constants["acc_delta_scale_ptr"] = None
    if not grad_scaler:
        constants["grad_scale_ptr"] = constants["found_inf_ptr"] = None
    return constants


def compile_kernel(
    mode: DtypeMode | str, block_size: int, num_warps: int, target: str | GPUTarget, grad_scaler: bool = False
) -> Any:
    """Compile ``adadelta_kernel`` for one dtype mode, config and target, without a GPU.

    Args:
        mode: a :class:`DtypeMode` or a key of :data:`DTYPE_MODES`.
        block_size, num_warps: the autotune config.
        target: a key of :data:`TARGETS` or a ``GPUTarget``.
        grad_scaler: compile with ``grad_scale`` and ``found_inf`` (GradScaler).

    Returns:
        Triton's compiled kernel; ``.asm`` holds ``ttir``, ``ttgir``, ``ptx`` and
        ``cubin`` (or ``amdgcn`` and ``hsaco``). Under ``TRITON_INTERPRET=1`` it is
        compiled in a child process and only ``.asm`` comes back.
    """
    if _interpreted():
        mode_name = mode if isinstance(mode, str) else mode.name
        if not isinstance(target, str):
            raise ValueError("under TRITON_INTERPRET=1, name the target by its key in TARGETS")
        return _run_in_children([(mode_name, block_size, num_warps, target, grad_scaler)], with_reports=False)[0][0]
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    gpu_target = TARGETS[target] if isinstance(target, str) else target
    names = _arg_names()
    signature = _signature(mode, grad_scaler)
    constants = _constants(mode, block_size, grad_scaler)
    for name in constants:
        signature[name] = "constexpr"
    if set(signature) != set(names):
        raise RuntimeError(f"the AOT signature no longer matches the kernel: {sorted(set(signature) ^ set(names))}")
    signature = {name: signature[name] for name in names}
    # What the JIT gives every 16-byte-aligned tensor argument.
    divisible = [name for name, kind in signature.items() if kind.startswith("*")]
    source = ASTSource(
        fn=adadelta_kernel.fn,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible},
    )
    # Each operation rounded once, as at launch (kernels/adadelta.py).
    return triton.compile(source, target=gpu_target, options={"num_warps": num_warps, "enable_fp_fusion": False})


# ---------------------------------------------------------------- inspection
def _ptxas_resources(ptx: str, capability: int, cubin: bytes) -> tuple[int, int, int, int, bool]:
    """(registers, stack frame, spill stores, spill loads, cubin is Triton's) from ``ptxas -v``.

    The command is Triton's own (``make_cubin`` in triton 3.9's NVIDIA backend, with
    FMA contraction off and default knobs): the same ptxas binary and flags.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, "kernel.ptx")
        binary = os.path.join(directory, "kernel.cubin")
        with open(source, "w") as handle:
            handle.write(ptx)
        command = [
            ptxas, "-lineinfo", "--fmad=false", "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o", binary,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        with open(binary, "rb") as handle:
            matches = handle.read() == cubin
    log = result.stdout + result.stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if frame is None or registers is None:
        raise RuntimeError(f"ptxas -v printed no stack frame / registers:\n{log}")
    return int(registers.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3)), matches


def _sass_instructions(cubin: bytes) -> int | None:
    """Instructions in ``cubin``'s SASS, NOPs left out (None without Triton's cuobjdump)."""
    try:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        return None
    with tempfile.TemporaryDirectory() as directory:
        binary = os.path.join(directory, "kernel.cubin")
        with open(binary, "wb") as handle:
            handle.write(cubin)
        listing = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True, check=True).stdout
    # Each instruction line: /*address*/ [predicate] OPCODE ...
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", listing)
    return sum(1 for opcode in opcodes if opcode != "NOP")


def _amdgcn_resources(assembly: str) -> dict[str, int]:
    """VGPRs, scratch bytes per lane (where spills go) and spill counts of an AMD kernel."""
    fields = {
        "registers": r";\s*NumVgprs:\s*(\d+)",
        "scratch": r";\s*ScratchSize:\s*(\d+)",
        "private_segment": r"\.private_segment_fixed_size:\s*(\d+)",
        "vgpr_spills": r"\.vgpr_spill_count:\s*(\d+)",
        "sgpr_spills": r"\.sgpr_spill_count:\s*(\d+)",
    }
    found = {}
    for name, pattern in fields.items():
        match = re.search(pattern, assembly)
        if match is None:
            raise RuntimeError(f"the AMD assembly has no {pattern!r}")
        found[name] = int(match.group(1))
    return found


@dataclass(frozen=True)
class _KernelSource:
    """Where the kernel is in its file: its lines, and the two ``_update_block`` calls."""

    path: str
    first_line: int
    last_line: int
    aligned_call: int
    unaligned_call: int
    scale_lines: frozenset[int] = frozenset()  # the lines of 8-bit state's scale accesses


def _kernel_source() -> _KernelSource:
    """Find the ``if ...: _update_block(...) else: _update_block(...)`` of the kernel."""
    fn = _kernel_python_function()
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))

    def update_call(statements: list[ast.stmt]) -> int | None:
        for statement in statements:
            for node in ast.walk(statement):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_update_block":
                    return node.lineno
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            aligned, unaligned = update_call(node.body), update_call(node.orelse)
            if aligned is not None and unaligned is not None:
                path = os.path.realpath(inspect.getsourcefile(fn) or "")
                with open(path) as file:
                    scale_lines = frozenset(
                        number for number, text in enumerate(file, 1) if "_scale_ptr + scale_index" in text
                    )
                return _KernelSource(
                    path=path,
                    first_line=first,
                    last_line=first + len(lines) - 1,
                    aligned_call=first + aligned - 1,
                    unaligned_call=first + unaligned - 1,
                    scale_lines=scale_lines,
                )
    raise RuntimeError("adadelta_kernel has no if/else with an _update_block call in each branch")


ALIGNED, UNALIGNED, BOOKKEEPING, UNATTRIBUTED = "aligned", "unaligned", "bookkeeping", "unattributed"
SCALES = "-scales"

_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"')
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(.*)$")
_PTX_INLINED = re.compile(r"inlined_at\s+(\d+)\s+(\d+)\s+\d+")
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")
_AMD_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:\s+"([^"]*)")?')
_AMD_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_AMD_INLINED = re.compile(r"@\[\s*([^\s:]+):(\d+):\d+")
_AMD_ACCESS = re.compile(r"^\s*(?:global|buffer)_(load|store)_(\w+)")


def _ptx_width(suffix: str) -> int:
    parts = suffix.strip(".").split(".")
    vector = next((int(part[1:]) for part in parts if re.fullmatch(r"v\d+", part)), 1)
    bits = next(int(part[1:]) for part in reversed(parts) if re.fullmatch(r"[bufs]\d+", part))
    return vector * bits


def _amd_width(suffix: str) -> int:
    if match := re.match(r"dwordx(\d)", suffix):
        return 32 * int(match.group(1))
    if suffix.startswith("dword"):
        return 32
    if match := re.match(r"b(\d+)", suffix):
        return int(match.group(1))
    if re.match(r"[us]?short", suffix):
        return 16
    if re.match(r"[us]?byte", suffix):
        return 8
    raise RuntimeError(f"unknown AMD memory instruction suffix {suffix!r}")


def _classify(site_line: int | None, in_kernel_file: bool, source: _KernelSource) -> str:
    """Which branch a debug location belongs to (its outermost call site in the kernel)."""
    if not in_kernel_file or site_line is None or site_line == 0:
        return UNATTRIBUTED
    if site_line == source.aligned_call:
        return ALIGNED
    if site_line == source.unaligned_call:
        return UNALIGNED
    if source.first_line <= site_line <= source.last_line:
        return BOOKKEEPING
    # A call site inside a helper: PTX names only the innermost call, so which
    # branch it belongs to cannot be told.
    return UNATTRIBUTED


def _accesses(assembly: str, is_amd: bool, source: _KernelSource) -> Iterator[tuple[str, str, int]]:
    """Every global load and store of the assembly: (branch, "load"/"store", bits).

    8-bit state's scale accesses (their own line in the kernel file) come under
    ``"<branch>" + SCALES``."""
    lines = assembly.splitlines()
    # The file table (at the end of a PTX file): index -> file name. Names, not paths:
    # Triton's cache is keyed on the source, not on its path, so a kernel compiled from
    # another checkout of the same code names that checkout's file.
    files: dict[str, str] = {}
    for line in lines:
        if is_amd and (match := _AMD_FILE.match(line)):
            files[match.group(1)] = os.path.basename(match.group(3) or match.group(2))
        elif not is_amd and (match := _PTX_FILE.match(line)):
            files[match.group(1)] = os.path.basename(match.group(2))
    where = UNATTRIBUTED
    kernel_name = os.path.basename(source.path)

    def scales(where: str, file_index: str, line_number: str) -> str:
        in_file = files.get(file_index) == kernel_name
        return where + SCALES if in_file and int(line_number) in source.scale_lines else where

    for line in lines:
        if is_amd:
            if match := _AMD_LOC.match(line):
                chain = _AMD_INLINED.findall(line)
                if chain:  # outermost call site last
                    name, site = chain[-1][0], int(chain[-1][1])
                    where = _classify(site, name == kernel_name, source)
                else:
                    in_file = files.get(match.group(1)) == kernel_name
                    where = _classify(int(match.group(2)), in_file, source)
                where = scales(where, match.group(1), match.group(2))
                continue
            if match := _AMD_ACCESS.match(line):
                yield where, match.group(1), _amd_width(match.group(2))
        else:
            if match := _PTX_LOC.match(line):
                inlined = _PTX_INLINED.search(match.group(3))
                if inlined:
                    file_index, site = inlined.group(1), int(inlined.group(2))
                else:
                    file_index, site = match.group(1), int(match.group(2))
                where = scales(_classify(site, files.get(file_index) == kernel_name, source), match.group(1), match.group(2))
                continue
            stripped = line.strip()
            if stripped.startswith("//"):
                continue
            for kind, suffix in _PTX_ACCESS.findall(stripped):
                yield where, "load" if kind == "ld" else "store", _ptx_width(suffix)


_ATTRIBUTES = re.compile(r"\{[^{}]*\}")
_IR_ACCESS = re.compile(
    r"\b(tt\.load|tt\.store|amdgpu\.buffer_load|amdgpu\.buffer_store)\b.*?tensor<(\d+)x(?:!tt\.ptr<)?(\w+)"
)


def _ir_branch_accesses(ttgir: str) -> dict[str, tuple[list[str], list[str]]]:
    """The tensor loads and stores (``"f32[4096]"``), by branch of the outermost ``scf.if``.

    Accesses outside any ``scf.if`` (the branches merged away) come under ``"neither"``.
    """
    found: dict[str, tuple[list[str], list[str]]] = {ALIGNED: ([], []), UNALIGNED: ([], []), "neither": ([], [])}
    frames: list[list[str]] = []  # [kind, branch] per open region
    for line in ttgir.splitlines():
        stripped = line.strip()
        if stripped.startswith("} else {"):
            frames[-1][1] = "else"
            continue
        # (Attribute dicts such as `{tt.divisibility = dense<4> : tensor<1xi32>}` name types too.)
        match = _IR_ACCESS.search(_ATTRIBUTES.sub("", line))
        if match:
            ifs = [frame for frame in frames if frame[0] == "if"]
            branch = "neither" if not ifs else (ALIGNED if ifs[0][1] == "then" else UNALIGNED)
            loads, stores = found[branch]
            (loads if "load" in match.group(1) else stores).append(f"{match.group(3)}[{match.group(2)}]")
        opened = line.count("{") - line.count("}")
        if opened > 0:
            frames.append(["if" if "scf.if" in line else "other", "then"])
        elif opened < 0 and frames:
            frames.pop()
    return found


def _ttir_offset_problems(ttir: str, block_size: int) -> list[str]:
    """Why the block offsets or the streamed addresses might not be 64-bit (empty: they are)."""
    problems = []
    lines = [_ATTRIBUTES.sub("", line) for line in ttir.splitlines()]
    block_map_loads = [
        match.group(1)
        for line in lines
        if (match := re.match(r"\s*(%[\w.#]+) = tt\.load [^:]*: !tt\.ptr<i32>", line))
    ]
    if not block_map_loads:
        return ["Triton IR: no int32 load of the block map found"]
    widened = set()
    for name in block_map_loads:
        use = re.compile(re.escape(name) + r"(?![\w.#])")
        for line in lines:
            if not use.search(line) or re.match(rf"\s*{re.escape(name)} = ", line):
                continue
            extended = re.match(rf"\s*(%[\w.#]+) = arith\.extsi {re.escape(name)} : i32 to i64", line)
            if extended is None:
                problems.append(f"Triton IR: the block map's int32 {name} is used before it is widened: {line.strip()}")
            else:
                widened.add(extended.group(1))
    constants = {
        match.group(1)
        for line in lines
        if (match := re.match(rf"\s*(%[\w.#]+) = arith\.constant {block_size} : i64", line))
    }
    scaled = False
    for line in lines:
        if match := re.search(r"arith\.muli (%[\w.#]+), (%[\w.#]+) : i64\b", line):
            operands = {match.group(1), match.group(2)}
            scaled |= bool(operands & widened) and bool(operands & constants)
    if not scaled:
        problems.append(f"Triton IR: no i64 multiply of the widened block index by BLOCK_SIZE={block_size}")
    addresses = re.findall(r"tt\.addptr [^:]*: tensor<(\d+)x!tt\.ptr<\w+>[^,]*>, tensor<(\d+)x(\w+)", "\n".join(lines))
    if not addresses:
        problems.append("Triton IR: no tensor of addresses found")
    narrow = [kind for _, _, kind in addresses if kind != "i64"]
    if narrow:
        problems.append(f"Triton IR: {len(narrow)} tensors of addresses formed from {sorted(set(narrow))} offsets, not i64")
    return problems


def _ptx_offset_problems(ptx: str, block_map_param: int) -> list[str]:
    """Whether every int32 the PTX loads from the block map is only ever widened.

    The registers that hold addresses derived from the block map's pointer argument
    are followed through the arithmetic; the values loaded through them (piece and
    block indices) may only feed ``mul.wide``/``mad.wide``/``cvt`` to 64 bits.
    """
    instructions = [line.split("//")[0].strip() for line in ptx.splitlines()]
    instructions = [line for line in instructions if line and not line.startswith((".", "$", "{", "}"))]
    tainted: set[str] = set()
    values: set[str] = set()
    for line in instructions:
        if re.search(rf"\[\s*adadelta_kernel_param_{block_map_param}\s*\]", line):
            tainted.add(line.split()[1].rstrip(","))
            continue
        if load := re.match(r"(?:@!?%p\d+\s+)?ld\.global[\w.:]*\s+\{?([^}\[]*)\}?,\s*\[\s*(%rd\d+)", line):
            if load.group(2) in tainted:
                values.update(re.findall(r"%r\d+", load.group(1)))
            continue
        operands = re.findall(r"%[a-z]+\d+", line)
        if len(operands) >= 2 and any(operand in tainted for operand in operands[1:]):
            tainted.add(operands[0])
    if not values:
        return ["PTX: no int32 loaded from the block map found"]
    problems = []
    for value in sorted(values):
        for line in instructions:
            operands = re.findall(r"%[a-z]+\d+", line)
            if value not in operands[1:] or re.match(r"(?:@!?%p\d+\s+)?ld\.", line):
                continue
            if not re.match(r"(mul\.wide|mad\.wide)\.[su]32|cvt\.[su]64\.[su]32", line):
                problems.append(f"PTX: the block map's int32 {value} is used in 32 bits: {line}")
    return problems


def inspect_kernel(
    compiled: Any, mode: DtypeMode | str, target: str, block_size: int, num_warps: int, grad_scaler: bool = False
) -> KernelReport:
    """Read registers, spills, each branch's access widths and bytes per element, and offset width."""
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    asm = compiled.asm
    is_amd = "amdgcn" in asm
    source = _kernel_source()
    threads = (64 if is_amd else 32) * num_warps
    widths: dict[str, tuple[Counter[int], Counter[int]]] = {
        name + part: (Counter(), Counter())
        for name in (ALIGNED, UNALIGNED, BOOKKEEPING, UNATTRIBUTED)
        for part in ("", SCALES)
    }
    assembly = asm["amdgcn"] if is_amd else asm["ptx"]
    for where, kind, bits in _accesses(assembly, is_amd, source):
        widths[where][0 if kind == "load" else 1][bits] += 1
    ir = _ir_branch_accesses(asm["ttgir"])

    def branch(name: str) -> BranchReport:
        loads, stores = widths[name]
        moved_bits = sum(bits * count for bits, count in (loads + stores).items())
        per_element = moved_bits / 8 * threads / block_size
        scale_loads, scale_stores = widths[name + SCALES]
        return BranchReport(
            load_widths=dict(sorted(loads.items())),
            store_widths=dict(sorted(stores.items())),
            scale_load_widths=dict(sorted(scale_loads.items())),
            scale_store_widths=dict(sorted(scale_stores.items())),
            bytes_per_element=int(per_element) if per_element.is_integer() else per_element,
            ir_loads=ir[name][0],
            ir_stores=ir[name][1],
            block_size=block_size,
        )

    offset_problems = _ttir_offset_problems(asm["ttir"], block_size)
    if ir["neither"][0] or ir["neither"][1]:
        offset_problems = offset_problems + [
            f"Triton IR: tensor accesses outside the aligned/unaligned if: {ir['neither']}"
        ]
    if is_amd:
        resources = _amdgcn_resources(assembly)
        measured: dict[str, Any] = dict(
            registers=resources["registers"],
            spill_bytes=resources["scratch"],
            stack_frame_bytes=resources["private_segment"],
            spill_source="amdgcn ScratchSize/.vgpr_spill_count",
            vgpr_spills=resources["vgpr_spills"],
            sgpr_spills=resources["sgpr_spills"],
        )
    else:
        capability = TARGETS[target].arch if target in TARGETS else int(target.removeprefix("sm_"))
        registers, frame, stores, loads, matches = _ptxas_resources(assembly, capability, asm["cubin"])
        measured = dict(
            registers=registers,
            spill_bytes=stores + loads,
            stack_frame_bytes=frame,
            spill_source="ptxas -v",
            spill_store_bytes=stores,
            spill_load_bytes=loads,
            binary_matches=matches,
            sass_instructions=_sass_instructions(asm["cubin"]),
        )
        runtime_args = [name for name, kind in _signature(mode, grad_scaler).items()]
        offset_problems = offset_problems + _ptx_offset_problems(assembly, runtime_args.index("block_map_ptr"))
    other_loads, other_stores = widths[BOOKKEEPING]
    return KernelReport(
        mode=mode.name,
        target=target,
        block_size=block_size,
        num_warps=num_warps,
        grad_scaler=grad_scaler,
        aligned=branch(ALIGNED),
        unaligned=branch(UNALIGNED),
        floor_bytes=mode.floor_bytes,
        other_loads=dict(sorted(other_loads.items())),
        other_stores=dict(sorted(other_stores.items())),
        unattributed=sum(
            sum((widths[name][0] + widths[name][1]).values())
            for name in (UNATTRIBUTED, UNATTRIBUTED + SCALES, BOOKKEEPING + SCALES)
        ),
        offset_problems=offset_problems,
        **measured,
    )


def compile_and_inspect(
    mode: DtypeMode | str, block_size: int, num_warps: int, target: str, grad_scaler: bool = False
) -> tuple[Any, KernelReport]:
    """:func:`compile_kernel`, then :func:`inspect_kernel`."""
    if _interpreted():
        return _run_in_children([(mode if isinstance(mode, str) else mode.name, block_size, num_warps, target, grad_scaler)])[0]
    compiled = compile_kernel(mode, block_size, num_warps, target, grad_scaler)
    return compiled, inspect_kernel(compiled, mode, target, block_size, num_warps, grad_scaler)


def _work(job: Job, with_report: bool = True) -> tuple[CompiledAsm, KernelReport | None]:
    """One job in a worker process: compile (and inspect)."""
    mode, block_size, num_warps, target, *rest = job
    grad_scaler = bool(rest[0]) if rest else False
    compiled = compile_kernel(mode, block_size, num_warps, target, grad_scaler)
    report = inspect_kernel(compiled, mode, target, block_size, num_warps, grad_scaler) if with_report else None
    return CompiledAsm(dict(compiled.asm)), report


# A worker: reads (job, with_report) frames from stdin and answers each with a
# frame of `_work`'s result. Frames are 8-byte little-endian lengths, then a pickle.
# Anything the compiler prints goes to stderr, not into the frames.
_WORKER = """
import os, pickle, sys
frames = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
from triton_adadelta.kernels import aot
while size := sys.stdin.buffer.read(8):
    job, with_report = pickle.loads(sys.stdin.buffer.read(int.from_bytes(size, "little")))
    try:
        answer = (True, aot._work(job, with_report))
    except Exception as error:
        import traceback
        answer = (False, f"{job}: {traceback.format_exc()}")
    frame = pickle.dumps(answer)
    frames.write(len(frame).to_bytes(8, "little") + frame)
    frames.flush()
"""


def _send(stream: Any, value: Any) -> None:
    frame = pickle.dumps(value)
    stream.write(len(frame).to_bytes(8, "little") + frame)
    stream.flush()


def _receive(stream: Any) -> Any:
    size = stream.read(8)
    if len(size) < 8:
        raise EOFError
    return pickle.loads(stream.read(int.from_bytes(size, "little")))


def _run_in_children(
    jobs: list[Job],
    workers: int | None = None,
    progress: Callable[[], None] | None = None,
    with_reports: bool = True,
) -> list[tuple[Any, KernelReport]]:
    """Run :func:`_work` for every job in fresh worker processes; results in job order.

    The workers start without ``TRITON_INTERPRET``: under the interpreter every
    ``@triton.jit`` function, Triton's own ``tl.rand`` included, is an interpreter
    object that ``triton.compile`` cannot take, and the variable is read when a
    process imports the kernel.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: list[Any] = [None] * len(jobs)
    pending = queue.Queue()
    for item in enumerate(jobs):
        pending.put(item)
    failures: list[str] = []
    lock = threading.Lock()
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))

    def serve() -> None:
        # stderr to a file: a full pipe would stall the worker while we wait for a frame.
        log = tempfile.TemporaryFile()
        child = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
        )
        try:
            while not failures:
                try:
                    index, job = pending.get_nowait()
                except queue.Empty:
                    break
                _send(child.stdin, (job, with_reports))
                try:
                    ok, answer = _receive(child.stdout)
                except EOFError:
                    ok, answer = False, f"{job}: the worker died"
                with lock:
                    if not ok:
                        failures.append(answer)
                        break
                    results[index] = answer
                    if progress is not None:
                        progress()
        finally:
            child.stdin.close()
            if child.wait() != 0 and not failures:
                log.seek(0)
                failures.append(f"a compiling worker exited with {child.returncode}:\n{log.read().decode(errors='replace')}")
            log.close()

    threads = [threading.Thread(target=serve) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("compiling in a worker process failed:\n" + "\n".join(failures))
    return results


def compile_many(
    jobs: list[Job], *, workers: int | None = None, progress: Callable[[], None] | None = None
) -> list[tuple[Any, KernelReport]]:
    """:func:`compile_and_inspect` for many ``(mode, block_size, num_warps, target[, grad_scaler])``.

    Args:
        jobs: what to compile.
        workers: processes compiling at once (default: one per CPU). One, outside
            the interpreter, compiles here.
        progress: called once per finished job (e.g. a progress bar's ``update``).

    Returns:
        ``(compiled, report)`` per job, in order; ``compiled`` is Triton's kernel, or
        an object with its ``.asm`` when it was compiled in another process.
    """
    if workers == 1 and not _interpreted():
        results = []
        for job in jobs:
            compiled, report = compile_and_inspect(*job)
            results.append((compiled, report))
            if progress is not None:
                progress()
        return results
    return _run_in_children(jobs, workers, progress)
