"""Ahead-of-time compilation of ``adadelta_kernel`` for GPUs this machine does not have.

``triton.compile`` builds the kernel for ``sm_80``, ``sm_90`` (NVIDIA) or ``gfx942``
(AMD MI300) without a driver, and :func:`inspect_kernel` reads the result:

* registers and spill bytes, from ``cuobjdump --dump-resource-usage`` (the one
  shipped inside the triton wheel) on the cubin, or from the AMD assembly;
* the width of the global loads and stores of the streamed buffers (``p g v u``
  and the master copy), from the PTX / AMD assembly. The step-count loop and the
  scalar loads (``found_inf``, ``lr``, ``grad_scale``, fp64 hyper-parameters) are
  legitimately narrow and are left out: loop bodies are skipped, and the streamed
  bytes must all move in 128-bit accesses;
* the bytes moved per element: the distinct block-wide loads and stores (outside
  the step loop) in the Triton IR, by element type, to compare with DESIGN.md's
  floor;
* whether the block offset is 64-bit, so buffers past 2**31 elements address
  correctly.

Every pointer and ``n_elements`` carry ``tt.divisibility=16``, as the JIT adds for
16-byte-aligned buffers at run time; without it the PTX is scalar. FMA contraction
is off, as at launch.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .adadelta import adadelta_kernel

__all__ = [
    "DTYPE_MODES",
    "TARGETS",
    "DtypeMode",
    "KernelReport",
    "compile_kernel",
    "inspect_kernel",
    "compile_and_inspect",
    "compile_many",
]


@dataclass(frozen=True)
class DtypeMode:
    """One way the optimizer stores a buffer (DESIGN.md, "Dtype modes").

    Args:
        name: short label, e.g. ``"bf16+master"``.
        param: Triton type of params and grads (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"``).
        state: Triton type of ``square_avg`` and ``acc_delta``.
        master: an fp32 master copy is read and written.
        stochastic_rounding: the param store rounds stochastically.
        floor_bytes: bytes per element the kernel must move (DESIGN.md's floor).
    """

    name: str
    param: str
    state: str
    master: bool
    stochastic_rounding: bool
    floor_bytes: int


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
    )
}

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def param_dtype(mode: DtypeMode | str) -> torch.dtype:
    """The torch dtype of a mode's params (what :func:`configs_for` is keyed on)."""
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    return _TORCH_DTYPES[mode.param]


TARGETS: dict[str, GPUTarget] = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}

_ELEMENT_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1}
# Every pointer, and n_elements: what the JIT specializes on for aligned buffers.
_DIVISIBLE_ARGS = (
    "param_ptr", "grad_ptr", "square_avg_ptr", "acc_delta_ptr", "master_ptr", "step_ptr",
    "lr_ptr", "hparams_ptr", "grad_scale_ptr", "found_inf_ptr", "n_elements",
)  # fmt: skip


@dataclass
class KernelReport:
    """What one compiled kernel does, read from its IR, assembly and binary."""

    mode: str
    target: str
    block_size: int
    num_warps: int
    registers: int
    spill_bytes: int
    # Streamed accesses (outside the step loop), by width in bits: {bits: count}.
    load_widths: dict[int, int] = field(default_factory=dict)
    store_widths: dict[int, int] = field(default_factory=dict)
    # Bytes per thread the streamed buffers need, and how many move in 128-bit accesses.
    streamed_bytes_per_thread: int = 0
    bytes_in_128bit_loads: int = 0
    bytes_in_128bit_stores: int = 0
    bytes_per_element: int = 0
    floor_bytes: int = 0
    streamed_loads: list[str] = field(default_factory=list)
    streamed_stores: list[str] = field(default_factory=list)
    offsets_64bit: bool = False

    @property
    def vector_bits(self) -> int:
        """The narrowest width that streamed data moves in: 128 when every byte moves in 128-bit accesses."""
        if self.bytes_in_128bit_loads + self.bytes_in_128bit_stores >= self.streamed_bytes_per_thread:
            return 128
        widths = [bits for bits in (*self.load_widths, *self.store_widths) if bits > 0]
        return min(widths) if widths else 0

    @property
    def at_floor(self) -> bool:
        return self.bytes_per_element == self.floor_bytes


def _interpreted() -> bool:
    """Whether ``@triton.jit`` made interpreter functions (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(adadelta_kernel.fn, JITFunction)


@dataclass
class CompiledAsm:
    """The ``.asm`` of a kernel compiled in a child process."""

    asm: dict[str, Any]


def _compile_in_child(jobs: list[tuple[str, int, int, str]]) -> list[CompiledAsm]:
    """Compile in a fresh interpreter without ``TRITON_INTERPRET``.

    Under the interpreter every ``@triton.jit`` function, Triton's own ``tl.rand``
    included, is an interpreter object that ``triton.compile`` cannot take.
    """
    code = (
        "import pickle, sys; from triton_adadelta.kernels import aot; "
        "jobs = pickle.load(sys.stdin.buffer); "
        "sys.stdout.buffer.write(pickle.dumps([dict(aot.compile_kernel(*job).asm) for job in jobs]))"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(jobs), capture_output=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling in a child process failed:\n{result.stderr.decode(errors='replace')}")
    return [CompiledAsm(asm) for asm in pickle.loads(result.stdout)]


def _signature(mode: DtypeMode) -> dict[str, str]:
    param, state = f"*{mode.param}", f"*{mode.state}"
    return {
        "param_ptr": param, "grad_ptr": param, "square_avg_ptr": state, "acc_delta_ptr": state,
        "master_ptr": "*fp32", "step_ptr": "*fp32", "lr_ptr": "*fp32", "hparams_ptr": "*fp64",
        "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
        "n_elements": "i64", "n_steps": "i32", "size_bucket": "i32",
        "lr": "fp32", "rho": "fp32", "one_minus_rho": "fp32", "eps": "fp32", "weight_decay": "fp32",
        "seed": "i32",
    }  # fmt: skip


def compile_kernel(mode: DtypeMode | str, block_size: int, num_warps: int, target: str | GPUTarget) -> Any:
    """Compile ``adadelta_kernel`` for one dtype mode, config and target, without a GPU.

    Args:
        mode: a :class:`DtypeMode` or a key of :data:`DTYPE_MODES`.
        block_size, num_warps: the autotune config.
        target: a key of :data:`TARGETS` or a ``GPUTarget``.

    Returns:
        Triton's compiled kernel; ``.asm`` holds ``ttir``, ``ttgir``, ``ptx`` and
        ``cubin`` (or ``amdgcn`` and ``hsaco``).
    """
    if _interpreted():
        if not isinstance(mode, str) or not isinstance(target, str):
            mode, target = getattr(mode, "name", mode), getattr(target, "name", target)
        return _compile_in_child([(str(mode), block_size, num_warps, str(target))])[0]
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    gpu_target = TARGETS[target] if isinstance(target, str) else target
    fn = adadelta_kernel.fn
    names = list(fn.arg_names)
    signature = _signature(mode)
    constants = {
        "MAXIMIZE": False,
        "HAS_MASTER": mode.master,
        "STOCHASTIC_ROUNDING": mode.stochastic_rounding,
        "LR_IS_TENSOR": False,
        "HPARAMS_IN_TENSOR": mode.param == "fp64",
        "HAS_GRAD_SCALE": False,
        "HAS_FOUND_INF": False,
        "COMPUTE_DTYPE": tl.float64 if mode.param == "fp64" else tl.float32,
        "BLOCK_SIZE": block_size,
    }
    for name in constants:
        signature[name] = "constexpr"
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in _DIVISIBLE_ARGS},
    )
    # Each operation rounded once, as at launch (kernels/adadelta.py).
    return triton.compile(source, target=gpu_target, options={"num_warps": num_warps, "enable_fp_fusion": False})


# ---------------------------------------------------------------- inspection
def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) of the cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        output = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    registers = re.search(r"REG:(\d+)", output)
    local = re.search(r"LOCAL:(\d+)", output)
    if registers is None or local is None:
        raise RuntimeError(f"cuobjdump printed no REG/LOCAL:\n{output}")
    return int(registers.group(1)), int(local.group(1))


def _amdgcn_resources(assembly: str) -> tuple[int, int]:
    """(VGPRs, scratch bytes) of an AMD kernel: spills land in scratch."""
    vgprs = re.search(r";\s*NumVgprs:\s*(\d+)", assembly)
    scratch = re.search(r";\s*ScratchSize:\s*(\d+)", assembly)
    if vgprs is None or scratch is None:
        raise RuntimeError("the AMD assembly has no NumVgprs/ScratchSize comments")
    return int(vgprs.group(1)), int(scratch.group(1))


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bufs](\d+)\b")
_AMD_ACCESS = re.compile(r"\b(?:global|buffer)_(load|store)_(dwordx(\d)|dword|short|ushort|sshort|byte|ubyte|sbyte|b(\d+))\b")


def _ptx_loop_lines(lines: list[str]) -> set[int]:
    """Indices of PTX lines inside loops: from a label to a later branch back to it."""
    labels = {}
    inside: set[int] = set()
    for index, line in enumerate(lines):
        label = re.match(r"\s*(\$L__BB\w+):", line)
        if label:
            labels[label.group(1)] = index
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)
        if branch and branch.group(1) in labels:
            inside.update(range(labels[branch.group(1)], index + 1))
    return inside


def _amdgcn_loop_lines(lines: list[str]) -> set[int]:
    """Indices of AMD assembly lines in loop blocks, from LLVM's "in Loop" block comments."""
    headers = {f".L{match}" for match in re.findall(r"Header=(BB\w+)", "\n".join(lines))}
    inside: set[int] = set()
    in_loop = False
    for index, line in enumerate(lines):
        label = re.match(r"\s*(\.LBB\w+):", line)
        if label:
            in_loop = "in Loop" in line or label.group(1) in headers
        elif re.match(r"\s*\.(end|size|Lfunc_end)", line):
            in_loop = False
        if in_loop:
            inside.add(index)
    return inside


def _access_widths(assembly: str, is_amd: bool) -> tuple[Counter[int], Counter[int]]:
    """Loads and stores outside loops, counted by width in bits."""
    lines = assembly.splitlines()
    loops = _amdgcn_loop_lines(lines) if is_amd else _ptx_loop_lines(lines)
    loads: Counter[int] = Counter()
    stores: Counter[int] = Counter()
    for index, line in enumerate(lines):
        if index in loops or line.lstrip().startswith(("//", ";")):
            continue
        if is_amd:
            for kind, suffix, dwords, bits in _AMD_ACCESS.findall(line):
                if dwords:
                    width = 32 * int(dwords)
                elif bits:
                    width = int(bits)
                else:
                    width = {"dword": 32, "short": 16, "ushort": 16, "sshort": 16}.get(suffix, 8)
                (loads if kind == "load" else stores)[width] += 1
        else:
            for kind, vector, bits in _PTX_ACCESS.findall(line):
                width = int(bits) * (int(vector) if vector else 1)
                (loads if kind == "ld" else stores)[width] += 1
    return loads, stores


_IR_ACCESS = re.compile(
    r"\b(tt\.load|tt\.store|amdgpu\.buffer_load|amdgpu\.buffer_store)\b.*?tensor<(\d+)x(?:!tt\.ptr<)?(\w+)"
)


def _streamed_accesses(ttgir: str, block_size: int) -> tuple[list[str], list[str]]:
    """Element types of the block-wide loads and stores outside ``scf.for`` (the step loop)."""
    loads: list[str] = []
    stores: list[str] = []
    depth = 0
    loop_depths: list[int] = []
    for line in ttgir.splitlines():
        if "scf.for" in line:
            loop_depths.append(depth)
        match = _IR_ACCESS.search(line)
        if match and not loop_depths and int(match.group(2)) == block_size:
            (loads if "load" in match.group(1) else stores).append(match.group(3))
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return loads, stores


def _offsets_64bit(ttir: str, ptx: str | None, block_size: int) -> bool:
    """Whether the block offset ``pid * BLOCK_SIZE`` is computed in 64 bits.

    In the Triton IR the program id is sign-extended to i64 before the multiply and
    the offsets are an i64 tensor; in the PTX, when given, the ``%ctaid.x`` register
    is widened (``mul.wide``, or ``cvt`` to 64 bits) before it forms addresses.
    """
    widened = re.search(r"%(\w+) = arith\.extsi %pid\w* : i32 to i64", ttir)
    if widened is None:
        return False
    name = widened.group(1)
    scaled = re.search(rf"arith\.muli (?:%{name}, %\w+|%\w+, %{name}) : i64", ttir)
    if scaled is None or f"tensor<{block_size}xi64" not in ttir:
        return False
    if ptx is None:
        return True
    program_id = re.search(r"mov\.u32\s+(%r\d+), %ctaid\.x;", ptx)
    if program_id is None:
        return False
    register = re.escape(program_id.group(1))
    return re.search(rf"(mul\.wide\.[su]32|cvt\.[su]64\.[su]32)\s+%rd\d+, {register}\b", ptx) is not None


def inspect_kernel(compiled: Any, mode: DtypeMode | str, target: str, block_size: int, num_warps: int) -> KernelReport:
    """Read registers, spills, access widths, bytes per element and offset width."""
    mode = DTYPE_MODES[mode] if isinstance(mode, str) else mode
    is_amd = "amdgcn" in compiled.asm
    if is_amd:
        assembly = compiled.asm["amdgcn"]
        registers, spill_bytes = _amdgcn_resources(assembly)
        threads = 64 * num_warps
    else:
        assembly = compiled.asm["ptx"]
        registers, spill_bytes = _cubin_resources(compiled.asm["cubin"])
        threads = 32 * num_warps
    loads, stores = _access_widths(assembly, is_amd)
    streamed_loads, streamed_stores = _streamed_accesses(compiled.asm["ttgir"], block_size)
    bytes_per_element = sum(_ELEMENT_BYTES[t] for t in streamed_loads + streamed_stores)
    return KernelReport(
        mode=mode.name,
        target=target,
        block_size=block_size,
        num_warps=num_warps,
        registers=registers,
        spill_bytes=spill_bytes,
        load_widths=dict(sorted(loads.items())),
        store_widths=dict(sorted(stores.items())),
        streamed_bytes_per_thread=block_size * bytes_per_element // threads,
        bytes_in_128bit_loads=16 * loads.get(128, 0),
        bytes_in_128bit_stores=16 * stores.get(128, 0),
        bytes_per_element=bytes_per_element,
        floor_bytes=mode.floor_bytes,
        streamed_loads=streamed_loads,
        streamed_stores=streamed_stores,
        offsets_64bit=_offsets_64bit(compiled.asm["ttir"], None if is_amd else assembly, block_size),
    )


def compile_and_inspect(mode: DtypeMode | str, block_size: int, num_warps: int, target: str) -> tuple[Any, KernelReport]:
    """:func:`compile_kernel`, then :func:`inspect_kernel`."""
    compiled = compile_kernel(mode, block_size, num_warps, target)
    return compiled, inspect_kernel(compiled, mode, target, block_size, num_warps)


def compile_many(jobs: list[tuple[str, int, int, str]]) -> list[tuple[Any, KernelReport]]:
    """:func:`compile_and_inspect` for many ``(mode, block_size, num_warps, target)``.

    Under the interpreter they compile in one child process, not one each.
    """
    if _interpreted():
        compiled = _compile_in_child(jobs)
    else:
        compiled = [compile_kernel(*job) for job in jobs]
    return [
        (kernel, inspect_kernel(kernel, mode, target, block_size, num_warps))
        for kernel, (mode, block_size, num_warps, target) in zip(compiled, jobs)
    ]
