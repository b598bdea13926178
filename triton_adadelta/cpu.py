"""The CPU path: the AdaDelta update over the same segment table, without Triton.

This is the update for CPU tensors (and any device Triton does not run on) when
``TRITON_INTERPRET`` is not set. :func:`adadelta_step_cpu_` takes the arguments of
the Triton launcher, :func:`triton_adadelta.kernels.adadelta.adadelta_step_`, and
follows the same equations in the same order (see that module's docstring): it reads
each param and grad where the model put them, through the table's addresses, and
the state at the table's offsets.

Two implementations; :func:`implementation` says which one runs a given state:

* ``"cpu-native"`` (fp32, fp64, bf16 and fp16 params, in every mode): one fused C
  loop over the whole table (``csrc/adadelta_cpu.c``), compiled once per machine
  with the system C compiler, cached on disk, and called through ``ctypes`` (which
  releases the GIL). It reads each element once and writes it once (28 B/param for
  fp32, 22 for bf16, 28 for bf16 with master weights), and splits a large table
  across torch's threads. Every operation rounds as the corresponding eager torch op
  does on this CPU (torch's ``add(alpha=)`` and ``addcmul`` are fused multiply-adds,
  everything else rounds once per op); bf16/fp16 values are widened exactly and
  stored rounded to nearest even, as the kernel does, and stochastic rounding draws
  the kernel's noise (a hash of the state index), so a step gives the kernel's bits.
  Its sqrt is the correctly rounded one, as in the Triton kernel; with
  ``TRITON_ADADELTA_CPU_SQRT=torch`` it calls torch's own sqrt and is bit-identical
  to ``torch.optim.Adadelta`` (:func:`matches_torch_sqrt`). The first call in a fresh
  cache compiles for a few seconds; later processes load the cached library
  (:mod:`triton_adadelta.native_build`). uint8 (block-quantized) state is decoded,
  updated and encoded one quant block of 256 elements at a time, each block by one
  thread, into the kernel's codes and scales.
* ``"cpu-chunked"`` (no C compiler, ``TRITON_ADADELTA_NATIVE_CPU=0``, fp16 where the
  compiler lacks ``_Float16``, or a device other than the CPU): torch ops over
  cache-sized chunks of the table. Small params are gathered into one chunk (one
  ``torch.cat``) and written back with one ``torch._foreach_copy_``, so a thousand
  small params cost a few ops, not a thousand times a dozen. Its stochastic
  rounding draws torch's noise, not the kernel's. uint8 state is encoded with
  :mod:`triton_adadelta.quant` (the kernel's codes and scales; a chunk holds whole
  quant blocks).

Neither reads a tensor's value on the host: lr (in the hyper-parameter table),
``grad_scale`` and ``found_inf`` are read by the C loop through pointers, and by
the chunked ops on the device, so ``step()`` stays free of host syncs.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kernels.adadelta import (
    ALIGNED_ROW,
    EPS,
    GRAD_ROW,
    GROUP_ROW,
    LR,
    LR_IS_TENSOR,
    MAXIMIZE,
    N_HPARAMS,
    N_TABLE_ROWS,
    NUMEL_ROW,
    ONE_MINUS_RHO,
    PARAM_ROW,
    PARAM_NOISE_WORDS,
    QUANT_BLOCK,
    RHO,
    STATE_ROW,
    WEIGHT_DECAY,
    SegmentTable,
    check_launch,
    check_quantized_state,
    state_dtype_for,
)
from .flat import hparams_table, table_for_tensors
from .native_build import BuildError, awaited_build, cpu_model, load_cached
from .quant import dequantize, quantize_, state_noise

__all__ = [
    "CHUNK_ELEMENTS",
    "NATIVE_PARALLEL_MIN_ELEMENTS",
    "adadelta_step_cpu_",
    "implementation",
    "matches_torch_sqrt",
    "native_library",
    "stochastic_round_",
]

# Elements per chunk of the chunked path: 64K fp32 elements is 256 KiB per buffer,
# so the chunk's p, g, v, u and the scratch buffers stay within a 2 MiB L2.
# (Not re-tuned: every mode takes the native loop where it can be built.)
CHUNK_ELEMENTS = 1 << 16

# A param at least this long gets chunks of its own, updated in place; shorter
# ones are gathered with their neighbours.
_OWN_CHUNK_ELEMENTS = CHUNK_ELEMENTS // 2

# Below this many elements in the table the native loop runs on the calling thread
# only: starting a thread costs ~20 us, more than a 256K-element update saves by
# splitting.
NATIVE_PARALLEL_MIN_ELEMENTS = 1 << 18

_SOURCE = Path(__file__).parent / "csrc" / "adadelta_cpu.c"

# -ffp-contract=off: only the explicit fma() calls fuse (see the source). -fno-math-errno
# lets sqrt vectorize; it changes no value. No -ffast-math: it would reassociate.
_NATIVE_CFLAGS = [
    "-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
    "-Werror=implicit-function-declaration", "-fPIC", "-shared", "-pthread", "-lm",
]  # fmt: skip
# Translation units of the C source, compiled at once: the entry points with the
# fp32/fp64, fp32-state and bf16-state loops, and the uint8-state loops (its ADADELTA_PART).
_NATIVE_PARTS = (("-DADADELTA_PART=0",), ("-DADADELTA_PART=1",))

# The table layout the C source was written for, as it exports it (adadelta_layout).
_LAYOUT = (
    PARAM_ROW, GRAD_ROW, STATE_ROW, NUMEL_ROW, GROUP_ROW, ALIGNED_ROW, N_TABLE_ROWS,
    LR, RHO, ONE_MINUS_RHO, EPS, WEIGHT_DECAY, MAXIMIZE, LR_IS_TENSOR, N_HPARAMS,
)  # fmt: skip

# The library's constants that must be the kernel's, checked at load: (symbol, its
# ctypes type, the kernel's value).
_NATIVE_CONSTANTS = (
    ("adadelta_param_noise_words", ctypes.c_uint32, PARAM_NOISE_WORDS),  # the params' noise's first word
    ("adadelta_quant_block", ctypes.c_int, QUANT_BLOCK),  # uint8 state's elements per scale
)
# What the library must export; one without them is a bad file (rebuilt by the next process).
_NATIVE_SYMBOLS = (
    "adadelta_layout", "adadelta_step_f32", "adadelta_step_f64", "adadelta_step_lowp", "adadelta_step_bf16_state",
    "adadelta_step_u8_state", "adadelta_has_f16", "set_sqrt", "set_openmp",
    *(name for name, _, _ in _NATIVE_CONSTANTS),
)  # fmt: skip

# The compiler's time limit. On the 2-core machine we measure on (gcc 12), one
# translation unit of the whole source took 12.9 s on one day (bench_step's
# native_cpu_build) and longer than 20 s on another; in two parts at once the build
# took 11.7 s on that day, 14.5 s in bench_step's run of 2026-11-26, and a fresh
# cache's first step 19.5 s by hand hours later, as this machine slowed. A timeout
# sends the CPU path to its chunked ops for an hour (native_build.FAILURE_MEMORY_S),
# which costs far more than a longer wait for a hanging compiler, so the limit keeps
# half again the slowest build seen.
_NATIVE_BUILD_TIMEOUT_S = 30.0

_NATIVE_DTYPES = (torch.float32, torch.float64)
# Low-precision params: their kind in the C source, and how the update is stored.
_NATIVE_KINDS = {torch.bfloat16: 0, torch.float16: 1}
# With bf16 state (adadelta_step_bf16_state) fp32 params are a kind too; uint8 state
# (adadelta_step_u8_state) takes the same kinds.
_NATIVE_BF16_STATE_KINDS = {**_NATIVE_KINDS, torch.float32: 2}
_COMPRESSED_STATE_DTYPES = (torch.bfloat16, torch.uint8)
_STORE_NEAREST, _STORE_MASTER, _STORE_STOCHASTIC = range(3)

_VERSION = operator.attrgetter("_version")

_native_lock = threading.Lock()
_native_library: ctypes.CDLL | None = None
_native_tried = False
# Whether the loaded library runs fp16 params (its compiler had _Float16): read once.
_native_f16 = False
# The self-check of the torch-sqrt mode: None until run, then its verdict.
_torch_sqrt_checked: bool | None = None


# --------------------------------------------------------------------------- native


def _build_native_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or load from the cache) the fused loop.

    Args:
        extra_flags: compiler flags after ``_NATIVE_CFLAGS`` (the tests build the loop
            without AVX-512 too, with ``-mno-avx512f``, to check its 8-lane loops on a
            machine that has it).

    Raises:
        BuildError: saying why it cannot be built, loaded, or trusted.
    """
    # -march=native code is only valid on this kind of CPU: the cache is keyed on it.
    with awaited_build():  # (the step waits: the param reader's build waits for it)
        library = load_cached(
            "adadelta_cpu",
            _SOURCE,
            language="c",
            flags=[*_NATIVE_CFLAGS, *extra_flags],
            key_extra=cpu_model(),
            loader=ctypes.CDLL,
            symbols=_NATIVE_SYMBOLS,
            timeout_s=_NATIVE_BUILD_TIMEOUT_S,
            parts=_NATIVE_PARTS,
        )
    layout = tuple((ctypes.c_int64 * len(_LAYOUT)).in_dll(library, "adadelta_layout"))
    if layout != _LAYOUT:
        raise BuildError(f"{_SOURCE.name} reads the table as {layout}, but kernels/adadelta.py writes {_LAYOUT}")
    for name, ctype, expected in _NATIVE_CONSTANTS:
        value = ctype.in_dll(library, name).value
        if value != expected:
            raise BuildError(f"{_SOURCE.name} has {name} = {value}, but kernels/adadelta.py has {expected}")
    for suffix in ("f32", "f64"):
        function = getattr(library, f"adadelta_step_{suffix}")
        function.restype = ctypes.c_int
        # table, n_pieces, square_avg, acc_delta, n_state, hparams, n_groups,
        # grad_scale, found_inf, max_threads, parallel_min_elements, use_torch_sqrt
        function.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int64, ctypes.c_int,
        ]  # fmt: skip
    for name in ("adadelta_step_lowp", "adadelta_step_bf16_state"):
        function = getattr(library, name)
        function.restype = ctypes.c_int
        # table, n_pieces, square_avg, acc_delta, master, n_state, hparams, n_groups,
        # grad_scale, found_inf, max_threads, parallel_min_elements, use_torch_sqrt, kind, store, seed
        function.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
        ]  # fmt: skip
    function = library.adadelta_step_u8_state
    function.restype = ctypes.c_int
    # As adadelta_step_bf16_state, with square_avg_scale and acc_delta_scale after acc_delta.
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]  # fmt: skip
    library.set_sqrt.restype = None
    library.set_sqrt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.set_sqrt(*_torch_vml_sqrt())
    library.set_openmp.restype = None
    library.set_openmp.argtypes = [ctypes.c_void_p] * 3
    library.set_openmp(*_torch_openmp())
    return library


def matches_torch_sqrt() -> bool:
    """Whether the native loop rounds sqrt as torch does (``TRITON_ADADELTA_CPU_SQRT=torch``).

    By default it uses the correctly rounded sqrt, as the Triton kernel does: more
    accurate, and faster where torch's sqrt is MKL's (slow on AMD CPUs), but each
    sqrt may differ from torch's by one ulp. With ``torch``, the loop calls torch's
    own sqrt and is bit-identical to ``torch.optim.Adadelta``.
    """
    return os.environ.get("TRITON_ADADELTA_CPU_SQRT", "ieee") == "torch"


def _torch_vml_sqrt() -> tuple[int | None, int | None]:
    """Addresses of MKL's vmsSqrt/vmdSqrt inside libtorch_cpu, which torch's sqrt calls.

    (None, None) where torch is built without MKL; its sqrt is then the correctly
    rounded one, which the C library's sqrt matches.
    """
    library_path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        torch_cpu = ctypes.CDLL(str(library_path))  # already loaded: the same handle
        return (
            ctypes.cast(torch_cpu.vmsSqrt, ctypes.c_void_p).value,
            ctypes.cast(torch_cpu.vmdSqrt, ctypes.c_void_p).value,
        )
    except (OSError, AttributeError):
        return None, None


def _torch_openmp() -> tuple[int | None, int | None, int | None]:
    """``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` of the
    OpenMP runtime torch loaded, so that the loop splits its work on torch's own
    thread pool; (None, None, None) where torch's parallel backend is not OpenMP or its
    runtime is not GNU's (the loop then starts threads of its own)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None, None, None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
        if len(paths) != 1:
            return None, None, None
        runtime = ctypes.CDLL(paths.pop())  # already loaded: the same handle
        return tuple(  # type: ignore[return-value]
            ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value
            for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        )
    except (OSError, AttributeError):
        return None, None, None


def _native_matches_torch(library: ctypes.CDLL) -> bool:
    """Self-check: with torch's sqrt, the native loop gives the torch ops' bits.

    One table per dtype and mode (fp32, fp64; bf16 and fp16 rounded to nearest and
    with master weights), of awkward sizes (several blocks, ragged tails, an empty
    tail) in eight param groups, one per combination of maximize, weight decay and a
    tensor lr, with and without a grad scale, on data spanning many magnitudes.
    Run once per process; a mismatch (an unexpected sqrt, a compiler that contracts)
    switches the native loop off instead of changing results. (Stochastic rounding
    draws other noise on the chunked path: the tests compare it with the kernel.)
    """
    generator = torch.Generator().manual_seed(0)
    sizes = (1, 3, 4, 5, 255, 257, 1031, 3077)
    modes = [(dtype, False) for dtype in _NATIVE_DTYPES]
    modes += [(dtype, master) for dtype in _NATIVE_KINDS for master in (False, True)]
    for dtype, with_master in modes:
        if dtype == torch.float16 and not _native_f16:
            continue
        state_dtype = state_dtype_for(dtype)
        groups = tuple(
            (None if flags & 4 else 0.7, 0.9, 1e-6, 0.01 if flags & 2 else 0.0, bool(flags & 1)) for flags in range(8)
        )
        hparams = hparams_table(groups, state_dtype, torch.device("cpu"))
        hparams[:, LR] = 0.7  # the tensor lr's value, as the optimizer copies it in
        for grad_scale in (None, torch.tensor([3.0])):
            params, grads = [], []
            for size in sizes:
                magnitude = torch.exp(torch.randn(size, generator=generator, dtype=torch.float64) * 4)
                params.append(torch.randn(size, generator=generator).to(dtype))
                grads.append((torch.randn(size, generator=generator, dtype=torch.float64) * magnitude).to(dtype))
            rows = [i % len(groups) for i in range(len(sizes))]
            table, n_state = table_for_tensors(params, grads, groups=rows)
            square_avg = torch.rand(n_state, generator=generator, dtype=state_dtype) * 1e3
            acc_delta = torch.rand(n_state, generator=generator, dtype=state_dtype) * 1e-3
            master = torch.randn(n_state, generator=generator) if with_master else None
            expected_params = [param.clone() for param in params]
            expected_table, _ = table_for_tensors(expected_params, grads, groups=rows)
            expected_state = [square_avg.clone(), acc_delta.clone()]
            expected_master = None if master is None else master.clone()
            _native_step_(
                library, table, square_avg, acc_delta, hparams, grad_scale, None, use_torch_sqrt=True, master=master
            )
            _chunked_step_(expected_table, *expected_state, hparams, expected_master, False, 0, grad_scale, None)
            results = [*params, square_avg, acc_delta, *([] if master is None else [master])]
            expected = [*expected_params, *expected_state, *([] if master is None else [expected_master])]
            if not all(_same_values(a, b) for a, b in zip(results, expected)):
                return False
    return True


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, or NaN in both (fp16 grads overflow to inf; NaN payloads may differ)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _warn_once_native_off(reason: str) -> None:
    warnings.warn(
        f"triton_adadelta: the native CPU loop is off, and the CPU path runs chunked torch ops (slower): {reason}",
        RuntimeWarning,
        stacklevel=3,
    )


def native_library() -> ctypes.CDLL | None:
    """The compiled fused loop, built on first use; None where it cannot run.

    ``TRITON_ADADELTA_NATIVE_CPU=0`` switches it off. A failed build says why in one
    warning per process. With ``TRITON_ADADELTA_CPU_SQRT=torch`` it runs only after a
    self-check has found it bit-identical to torch's ops on this machine.
    """
    if os.environ.get("TRITON_ADADELTA_NATIVE_CPU", "1") == "0":
        return None
    if not _native_tried:
        _load_native()
    if _native_library is None:
        return None
    if matches_torch_sqrt():
        if _torch_sqrt_checked is None:
            _check_torch_sqrt()
        if not _torch_sqrt_checked:
            return None
    return _native_library


# Building and checking run eagerly, once per process, never inside a traced region.
@torch.compiler.disable
def _load_native() -> None:
    global _native_library, _native_tried, _native_f16
    with _native_lock:
        if _native_tried:
            return
        try:
            _native_library = _build_native_library()
            _native_f16 = ctypes.c_int.in_dll(_native_library, "adadelta_has_f16").value == 1
        except BuildError as error:
            _warn_once_native_off(str(error))
        _native_tried = True


@torch.compiler.disable
def _check_torch_sqrt() -> None:
    global _torch_sqrt_checked
    with _native_lock:
        if _torch_sqrt_checked is None and _native_library is not None:
            _torch_sqrt_checked = _native_matches_torch(_native_library)
            if not _torch_sqrt_checked:
                _warn_once_native_off(
                    "with TRITON_ADADELTA_CPU_SQRT=torch it did not match torch's rounding on this machine"
                )


def _scalar_pointer(value: torch.Tensor | None, dtype: torch.dtype) -> tuple[int | None, torch.Tensor | None]:
    """A pointer to a 1-element tensor of ``dtype`` (and the tensor, to keep it alive)."""
    if value is None:
        return None, None
    value = value.to(dtype).contiguous()
    return value.data_ptr(), value


def _native_step_(
    library: ctypes.CDLL,
    table: SegmentTable,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    hparams: torch.Tensor,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    *,
    use_torch_sqrt: bool,
    master: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
) -> None:
    """One C call over the whole table (fp32 or fp64 params, or bf16/fp16 against fp32
    state, or fp32/bf16/fp16 params against bf16 or uint8 state; uint8 state with its
    two scale buffers, checked by :func:`check_quantized_state`)."""
    dtype = hparams.dtype  # the compute dtype (the state's, but for bf16 state)
    pieces = table.pieces.contiguous()
    hparams = hparams.contiguous()
    scale_pointer, scale = _scalar_pointer(grad_scale, dtype)
    inf_pointer, inf = _scalar_pointer(found_inf, dtype)  # (the tensors stay alive through the call)
    common = (
        square_avg.numel(), hparams.data_ptr(), hparams.shape[0], scale_pointer, inf_pointer,
        torch.get_num_threads(), NATIVE_PARALLEL_MIN_ELEMENTS, int(use_torch_sqrt),
    )  # fmt: skip
    store = _STORE_MASTER if master is not None else _STORE_STOCHASTIC if stochastic_rounding else _STORE_NEAREST
    if square_avg.dtype == torch.uint8:
        check_quantized_state(square_avg, acc_delta, square_avg_scale, acc_delta_scale)
        assert square_avg_scale is not None and acc_delta_scale is not None  # (checked)
        result = library.adadelta_step_u8_state(
            pieces.data_ptr(), pieces.shape[1], square_avg.data_ptr(), acc_delta.data_ptr(),
            square_avg_scale.data_ptr(), acc_delta_scale.data_ptr(), None if master is None else master.data_ptr(),
            *common, _NATIVE_BF16_STATE_KINDS[table.param_dtype], store, seed,
        )  # fmt: skip
    elif square_avg.dtype == torch.bfloat16:
        result = library.adadelta_step_bf16_state(
            pieces.data_ptr(), pieces.shape[1], square_avg.data_ptr(), acc_delta.data_ptr(),
            None if master is None else master.data_ptr(), *common, _NATIVE_BF16_STATE_KINDS[table.param_dtype],
            store, seed,
        )  # fmt: skip
    elif table.param_dtype in _NATIVE_KINDS:
        result = library.adadelta_step_lowp(
            pieces.data_ptr(), pieces.shape[1], square_avg.data_ptr(), acc_delta.data_ptr(),
            None if master is None else master.data_ptr(), *common, _NATIVE_KINDS[table.param_dtype], store, seed,
        )  # fmt: skip
    else:
        function = library.adadelta_step_f32 if dtype == torch.float32 else library.adadelta_step_f64
        result = function(pieces.data_ptr(), pieces.shape[1], square_avg.data_ptr(), acc_delta.data_ptr(), *common)
    if result == -2:
        raise ValueError(f"the native CPU loop cannot run {table.param_dtype} params; nothing was changed")
    if result < 0:
        quantized = square_avg.dtype == torch.uint8
        raise ValueError(
            f"the segment table does not fit its state ({square_avg.numel()} elements) or its "
            f"hyper-parameters ({hparams.shape[0]} groups)"
            + (f", or a piece does not start at a multiple of {QUANT_BLOCK} elements" if quantized else "")
            + "; nothing was changed"
        )


# -------------------------------------------------------------------------- chunked


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, noise: torch.Tensor) -> None:
    """Store fp32 ``value`` into low-precision ``out``, rounding stochastically.

    ``value`` lies between two neighbours in ``out``'s dtype; it rounds to the far
    one with probability (distance to the near one) / (gap), so the expected store
    equals ``value``. ``noise`` is uniform in [0, 1).
    """
    nearest = value.to(out.dtype)
    nearest_value = nearest.float()
    # The other neighbour: the magnitude bits one up when |value| lies beyond
    # |nearest|, one down when it lies short of it.
    beyond = (value.abs() > nearest_value.abs()).to(torch.int16)
    other = (nearest.view(torch.int16) + (2 * beyond - 1)).view(out.dtype)
    fraction = (value - nearest_value) / (other.float() - nearest_value)
    # When value is exact, fraction is 0 (or NaN for a NaN gap): keep nearest.
    torch.where(noise < fraction, other, nearest, out=out)


def _flat_real(tensor: torch.Tensor) -> torch.Tensor:
    """The 1-D real view of a contiguous param or grad (complex as its real pairs)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor if tensor.dim() == 1 else tensor.view(-1)


@dataclass
class _Chunk:
    """Up to CHUNK_ELEMENTS consecutive state elements of one param group.

    Args:
        group: the row of the hyper-parameter table.
        state_start: the chunk's first element in the flat state.
        span: its length in the state, gaps included.
        entries: ``(tensor, first, length, position)``: ``length`` elements of
            ``table.written[tensor]`` from ``first`` on, at ``position`` in the span.
        mask: True where an entry lies, where the span has gaps (padding, or params
            outside the table) that must stay untouched; None without gaps.
        pads: zeros standing in for the params and grads in the gaps.
    """

    group: int
    state_start: int
    span: int
    entries: list[tuple[int, int, int, int]]
    mask: torch.Tensor | None = None
    pads: list[torch.Tensor | None] = field(default_factory=list)  # before each entry

    @property
    def gathered(self) -> bool:
        """Several params, gathered into scratch (a lone one is updated where it lies)."""
        return len(self.entries) > 1


class _ChunkPlan:
    """How the chunked path walks the pieces of a table: the parts that do not depend
    on addresses, shared (through ``table.cache``) by the tables of the same pieces."""

    def __init__(self, table: SegmentTable, device: torch.device) -> None:
        # The table's own rows, read once per set of pieces (not at every step).
        pieces = table.pieces if table.pieces.device.type == "cpu" else table.pieces.cpu()
        numels = table.numels.tolist()
        state = pieces[STATE_ROW].tolist()
        group = pieces[GROUP_ROW].tolist()
        param_dtype = table.param_dtype
        compute_dtype = state_dtype_for(param_dtype)
        self.chunks: list[_Chunk] = []
        self.numels: list[int] = []  # of each param, in real elements
        current: _Chunk | None = None
        for k in range(len(table.written)):
            bulk, tail = numels[2 * k], numels[2 * k + 1]
            numel, offset, row = bulk + tail, state[2 * k], group[2 * k]
            self.numels.append(numel)
            if tail and state[2 * k + 1] != offset + bulk:
                raise ValueError(f"the tail of param {k} does not follow its bulk in the state")
            if numel == 0:
                continue
            if numel >= _OWN_CHUNK_ELEMENTS:
                current = None
                for first in range(0, numel, CHUNK_ELEMENTS):
                    length = min(CHUNK_ELEMENTS, numel - first)
                    self.chunks.append(_Chunk(row, offset + first, length, [(k, first, length, 0)]))
                continue
            end = offset + numel
            if (
                current is None
                or current.group != row
                or offset < current.state_start + current.span
                or end - current.state_start > CHUNK_ELEMENTS
            ):
                current = _Chunk(row, offset, 0, [])
                self.chunks.append(current)
            current.entries.append((k, 0, numel, offset - current.state_start))
            current.span = end - current.state_start
        self.max_span = max((chunk.span for chunk in self.chunks), default=0)
        # What the table needs of the state and the hyper-parameters, checked at each step.
        self.state_end = max((chunk.state_start + chunk.span for chunk in self.chunks), default=0)
        self.n_groups = 1 + max((chunk.group for chunk in self.chunks), default=-1)
        if any(chunk.state_start < 0 or chunk.group < 0 for chunk in self.chunks):
            raise ValueError("the segment table has a negative state offset or group")

        for chunk in self.chunks:
            if not chunk.gathered:
                continue
            covered, gaps = 0, 0
            mask = torch.zeros(chunk.span, dtype=torch.bool)
            for _, _, length, position in chunk.entries:
                gap = position - covered
                chunk.pads.append(torch.zeros(gap, dtype=param_dtype, device=device) if gap else None)
                mask[position : position + length] = True
                covered, gaps = position + length, gaps + gap
            if gaps:
                chunk.mask = mask.to(device)

        # Scratch of the largest chunk, and its views at each gathered entry (the
        # sources of the write-back), made once: a lock keeps two steps apart.
        self.lock = threading.Lock()
        n = self.max_span
        self.scratch = {
            name: torch.empty(n, dtype=compute_dtype, device=device)
            for name in ("grad", "weights", "square_avg", "acc_delta", "new_weights", "std", "delta", "product")
        }
        self.scratch["low"] = torch.empty(n, dtype=param_dtype, device=device)
        self.scratch["old"] = torch.empty(n, dtype=param_dtype, device=device)
        self.scratch["low_grad"] = torch.empty(n, dtype=param_dtype, device=device)
        self.scratch["low_state"] = torch.empty(n, dtype=torch.bfloat16, device=device)
        self.noise = torch.empty(n, dtype=torch.float32, device=device)
        self.sources = {
            name: [
                [self.scratch[name][position : position + length] for _, _, length, position in chunk.entries]
                if chunk.gathered
                else []
                for chunk in self.chunks
            ]
            for name in ("new_weights", "low")
        }

    @staticmethod
    def of(table: SegmentTable, device: torch.device) -> _ChunkPlan:
        plan = table.cache.get("cpu_chunk_plan")
        if plan is None:
            plan = table.cache["cpu_chunk_plan"] = _ChunkPlan(table, device)
        return plan


@dataclass
class _TableViews:
    """The views of one table's params (or of one step's grads) that its chunks read and write."""

    tensors: list[list[torch.Tensor]]  # per chunk, per entry
    parts: list[list[torch.Tensor]]  # per gathered chunk: entries and pads, in state order


# Param views are made once per table (the optimizer reuses a table while addresses
# stay the same) and go with it. Grad views are made at each call and dropped: the
# grads are the step's, bound to the table for that step only, and holding them
# would keep them from being freed by zero_grad().
_param_views: weakref.WeakKeyDictionary[SegmentTable, _TableViews] = weakref.WeakKeyDictionary()


def _views_of(tensors: list[torch.Tensor], plan: _ChunkPlan) -> _TableViews:
    flats = list(map(_flat_real, tensors))
    numels = plan.numels

    def part(flat: torch.Tensor, k: int, first: int, length: int) -> torch.Tensor:
        return flat if length == numels[k] else flat[first : first + length]

    views, parts = [], []
    for chunk in plan.chunks:
        chunk_views = [part(flats[k], k, first, length) for k, first, length, _ in chunk.entries]
        views.append(chunk_views)
        parts.append(_interleave(chunk.pads, chunk_views) if chunk.gathered else [])
    return _TableViews(views, parts)


def _param_views_of(table: SegmentTable, plan: _ChunkPlan) -> _TableViews:
    views = _param_views.get(table)
    if views is None:
        views = _param_views[table] = _views_of(table.written, plan)
    return views


def _interleave(pads: list[torch.Tensor | None], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    interleaved = []
    for pad, part in zip(pads, parts):
        if pad is not None:
            interleaved.append(pad)
        interleaved.append(part)
    return interleaved


@dataclass
class _GroupScalars:
    """One param group's hyper-parameters as 0-dim tensors on the device.

    The flags are folded into values so that no branch reads them on the host:
    maximize is a sign, and the lr step is ``fma(d * lr_factor, lr_coefficient, p)``:
    ``fma(d, -lr, p)`` as torch's ``add(alpha=-lr)`` for a float lr, and
    ``p - d * lr`` as torch's capturable foreach for a tensor lr.
    """

    rho: torch.Tensor
    one_minus_rho: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor
    sign: torch.Tensor  # -1 to maximize, else 1
    has_weight_decay: torch.Tensor  # bool: weight_decay != 0 in the state's dtype
    lr_factor: torch.Tensor  # lr for a tensor lr, else 1
    lr_coefficient: torch.Tensor  # -1 for a tensor lr, else -lr


def _group_scalars(hparams: torch.Tensor) -> list[_GroupScalars]:
    lr = hparams[:, LR]
    lr_is_tensor = hparams[:, LR_IS_TENSOR] != 0
    columns = (
        hparams[:, RHO],
        hparams[:, ONE_MINUS_RHO],
        hparams[:, EPS],
        hparams[:, WEIGHT_DECAY],
        1 - 2 * hparams[:, MAXIMIZE],
        hparams[:, WEIGHT_DECAY] != 0,
        torch.where(lr_is_tensor, lr, 1.0),
        torch.where(lr_is_tensor, -1.0, -lr),
    )
    return [_GroupScalars(*row) for row in zip(*(column.unbind() for column in columns))]


def _update_(
    weights: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    new_weights: torch.Tensor,
    new_square_avg: torch.Tensor,
    new_acc_delta: torch.Tensor,
    scalars: _GroupScalars,
    grad_scale: torch.Tensor | None,
    scratch: dict[str, torch.Tensor],
) -> None:
    """The update of one chunk, as torch ops rounding as torch.optim.Adadelta's do.

    Reads ``weights``, ``grad`` (compute dtype), ``square_avg`` and ``acc_delta``;
    writes ``new_*``, which may be the inputs themselves (in place).
    """
    n = weights.numel()
    g_scratch, std_scratch, delta_scratch, product = (scratch[name][:n] for name in ("grad", "std", "delta", "product"))
    g = grad
    if grad_scale is not None:
        g = torch.div(g, grad_scale, out=g_scratch)
    g = torch.mul(g, scalars.sign, out=g_scratch)  # exact: maximize flips the sign
    # fma(p, wd, g), as torch's add(alpha=); skipped where wd == 0, as torch skips it
    # (0 * an inf param would be NaN).
    decayed = torch.addcmul(g, weights, scalars.weight_decay, out=product)
    g = torch.where(scalars.has_weight_decay, decayed, g, out=g_scratch)
    # addcmul with a tensor factor: fma(round((1 - rho) * g), g, rho * v), as torch's value=.
    torch.mul(square_avg, scalars.rho, out=new_square_avg)
    new_square_avg.addcmul_(torch.mul(g, scalars.one_minus_rho, out=product), g)
    std = torch.add(new_square_avg, scalars.eps, out=std_scratch).sqrt_()
    delta = torch.add(acc_delta, scalars.eps, out=delta_scratch).sqrt_().div_(std).mul_(g)
    torch.mul(acc_delta, scalars.rho, out=new_acc_delta)
    new_acc_delta.addcmul_(torch.mul(delta, scalars.one_minus_rho, out=product), delta)
    step = torch.mul(delta, scalars.lr_factor, out=product)
    torch.addcmul(weights, step, scalars.lr_coefficient, out=new_weights)


def _commit_(destination: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Write ``new`` where ``keep`` holds (everywhere when None); a no-op in place."""
    if keep is not None:
        torch.where(keep, new, destination, out=destination)
    elif new is not destination:
        destination.copy_(new)


def _chunked_step_(
    table: SegmentTable,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    hparams: torch.Tensor,
    master: torch.Tensor | None,
    stochastic_rounding: bool,
    seed: int,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    *,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
) -> None:
    """The update as torch ops, one cache-sized chunk of the table at a time."""
    device, compute_dtype, param_dtype = square_avg.device, hparams.dtype, table.param_dtype
    # bf16 state: widened into scratch, updated there, and rounded back stochastically.
    # uint8 state: decoded into scratch, updated there, and encoded back by quant
    # block; a chunk starts on a piece's start or a multiple of CHUNK_ELEMENTS into it,
    # so it holds whole quant blocks (but the padding after its last piece).
    compressed = square_avg.dtype != compute_dtype
    quantized = square_avg.dtype == torch.uint8
    plan = _ChunkPlan.of(table, device)
    if not plan.chunks:
        return
    if plan.state_end > square_avg.numel() or plan.n_groups > hparams.shape[0]:
        raise ValueError(
            f"the segment table does not fit its state ({square_avg.numel()} elements) or its "
            f"hyper-parameters ({hparams.shape[0]} groups); nothing was changed"
        )
    scales: tuple[torch.Tensor, torch.Tensor] | None = None
    if quantized:
        check_quantized_state(square_avg, acc_delta, square_avg_scale, acc_delta_scale)
        assert square_avg_scale is not None and acc_delta_scale is not None  # (checked)
        scales = (square_avg_scale, acc_delta_scale)
        if any(chunk.state_start % QUANT_BLOCK for chunk in plan.chunks):
            raise ValueError(f"uint8 state: every piece must start at a multiple of {QUANT_BLOCK} elements")
    grads = table.read or [param.grad for param in table.written]  # (see SegmentTable.read)
    param_views, grad_views = _param_views_of(table, plan), _views_of(grads, plan)
    scalars = _group_scalars(hparams)
    if grad_scale is not None:
        grad_scale = grad_scale.to(compute_dtype)  # as the native loop and the kernel round it
    # found_inf masks the writes on the device: its value never reaches the host.
    proceed = None if found_inf is None else (found_inf == 0).reshape(())
    generator = None
    if stochastic_rounding or (compressed and not quantized):
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    low_precision = param_dtype != compute_dtype
    # The optimizer's own writes leave the params' version counters as they were, as
    # the native loop's and the kernel's writes through addresses do: the optimizer
    # reads a changed counter as a write from outside (which the master copy follows).
    versions = list(map(_VERSION, table.written))

    with plan.lock:
        scratch = plan.scratch
        for c, chunk in enumerate(plan.chunks):
            n, start = chunk.span, chunk.state_start
            state = (square_avg[start : start + n], acc_delta[start : start + n])
            masters = None if master is None else master[start : start + n]
            # The inputs, in the state's layout and the compute dtype.
            old_params = None
            if chunk.gathered:
                # Gathered in the param dtype, then converted once: torch.cat's own
                # conversion is an order of magnitude slower than the two.
                grad = torch.cat(grad_views.parts[c], out=scratch["low_grad" if low_precision else "grad"][:n])
                if low_precision:
                    grad = scratch["grad"][:n].copy_(grad)
                if masters is None or proceed is not None:
                    old_params = torch.cat(param_views.parts[c], out=scratch["old"][:n])
                weights = masters if masters is not None else old_params
            else:
                (param,), (grad,) = param_views.tensors[c], grad_views.tensors[c]
                if low_precision:
                    grad = scratch["grad"][:n].copy_(grad)
                weights = masters if masters is not None else param
            if low_precision and masters is None:
                weights = scratch["weights"][:n].copy_(weights)

            # Where to write: not in the gaps of the span, and nowhere when found_inf is set.
            keep = proceed if chunk.mask is None else chunk.mask if proceed is None else chunk.mask & proceed
            new_weights = scratch["new_weights"][:n] if keep is not None or weights is old_params else weights
            inputs = state
            if quantized:
                assert scales is not None
                inputs = (
                    scratch["square_avg"][:n].copy_(_dequantize_chunk(state[0], scales[0], start)),
                    scratch["acc_delta"][:n].copy_(_dequantize_chunk(state[1], scales[1], start)),
                )
            elif compressed:
                inputs = (scratch["square_avg"][:n].copy_(state[0]), scratch["acc_delta"][:n].copy_(state[1]))
            if keep is None or compressed:
                new_state = inputs  # in place (in scratch for bf16 state)
            else:
                new_state = (scratch["square_avg"][:n], scratch["acc_delta"][:n])
            _update_(weights, grad, *inputs, new_weights, *new_state, scalars[chunk.group], grad_scale, scratch)
            if quantized:
                assert scales is not None
                blocks_kept = _blocks_to_keep(chunk.mask, proceed)
                # The kernel's noise: the halves of one hash per element.
                noise = state_noise(seed, start, n, device)
                halves = (noise & 0xFFFF, noise >> 16)
                for codes, block_scales, fresh, half, up in zip(state, scales, new_state, halves, (True, False)):
                    _store_quantized_(fresh, codes, block_scales, start, chunk.mask, keep, blocks_kept, half, up)
            elif compressed:
                low = scratch["low_state"][:n]
                for stored, fresh in zip(state, new_state):
                    torch.rand(n, generator=generator, device=device, out=plan.noise[:n])
                    stochastic_round_(low, fresh, plan.noise[:n])
                    _commit_(stored, low, keep)
            else:
                _commit_(state[0], new_state[0], keep)
                _commit_(state[1], new_state[1], keep)
            if masters is not None:
                _commit_(masters, new_weights, keep)

            # The params: the new weights, rounded to the param dtype.
            if stochastic_rounding:
                torch.rand(n, generator=generator, device=device, out=plan.noise[:n])
                stochastic_round_(scratch["low"][:n], new_weights, plan.noise[:n])
                stored, source = scratch["low"][:n], "low"
            elif low_precision:
                stored, source = scratch["low"][:n].copy_(new_weights), "low"
            else:
                stored, source = new_weights, "new_weights"
            if chunk.gathered:
                if proceed is not None:
                    torch.where(proceed, stored, old_params, out=stored)
                # One call writes back every param of the chunk (never the gaps).
                torch._foreach_copy_(param_views.tensors[c], plan.sources[source][c])
            elif stored is not param:
                _commit_(param, stored, proceed)
    torch._C._autograd._unsafe_set_version_counter(table.written, versions)


def _dequantize_chunk(codes: torch.Tensor, scales: torch.Tensor, start: int) -> torch.Tensor:
    """fp32 values of a chunk's uint8 ``codes`` (from state element ``start``, a multiple
    of QUANT_BLOCK), from the whole flat ``scales``."""
    first, n_blocks = start // QUANT_BLOCK, -(-codes.numel() // QUANT_BLOCK)
    return dequantize(codes, scales[first : first + n_blocks])


def _blocks_to_keep(valid: torch.Tensor | None, proceed: torch.Tensor | None) -> torch.Tensor | None:
    """Which quant blocks of a chunk get a new scale (None: all): those holding a piece
    (``valid``: True where one lies; None: everywhere), and none when ``proceed`` is False."""
    if valid is None:
        return proceed
    n_blocks = -(-valid.numel() // QUANT_BLOCK)
    padded = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.bool, device=valid.device)
    padded[: valid.numel()] = valid
    keep = padded.view(n_blocks, QUANT_BLOCK).any(dim=1)
    return keep if proceed is None else keep & proceed


def _store_quantized_(
    values: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    start: int,
    valid: torch.Tensor | None,
    keep: torch.Tensor | None,
    blocks_kept: torch.Tensor | None,
    noise: torch.Tensor,
    round_up_small: bool,
) -> None:
    """Encode a chunk's new fp32 ``values`` into its ``codes`` and its blocks' scales
    (from state element ``start``, a multiple of QUANT_BLOCK, in the whole flat
    ``scales``), rounded stochastically by ``noise`` (16 bits per value), as the C loop
    does (``round_up_small``: square_avg's, see :func:`quantize_`).

    ``valid``: True where a piece lies (None: everywhere): the gaps between pieces,
    padding or other params' state, count in no block's max. ``keep``: the codes
    written (None: all), ``blocks_kept``: the scales (see :func:`_blocks_to_keep`).
    """
    n_blocks = -(-values.numel() // QUANT_BLOCK)
    first = start // QUANT_BLOCK
    block_scales = scales[first : first + n_blocks]
    new_codes, new_scales = torch.empty_like(codes), torch.empty_like(block_scales)
    masked = values if valid is None else torch.where(valid, values, 0.0)
    quantize_(masked, new_codes, new_scales, noise, round_up_small)
    _commit_(codes, new_codes, keep)
    _commit_(block_scales, new_scales, blocks_kept)


# ---------------------------------------------------------------------------- entry


def implementation(
    device: torch.device,
    param_dtype: torch.dtype,
    *,
    master: bool,
    stochastic_rounding: bool,
    state_dtype: torch.dtype | None = None,
) -> str:
    """Which implementation of the CPU path updates such a state.

    Args:
        device: the state's device.
        param_dtype: the params' dtype (a complex dtype counts as its real parts).
        master: whether the state keeps an fp32 master copy.
        stochastic_rounding: whether param stores round stochastically.
        state_dtype: the state's dtype (default: the params' compute dtype; bf16, or
            uint8 for block-quantized state).

    Returns:
        ``"cpu-native"`` where the fused C loop runs it, else ``"cpu-chunked"``.
        Asking builds the C loop (once per process), so the answer is what runs.
    """
    if param_dtype.is_complex:
        param_dtype = torch.empty((), dtype=param_dtype).real.dtype
    native = _native_for(
        device, param_dtype, master=master, stochastic_rounding=stochastic_rounding,
        compressed_state=state_dtype in _COMPRESSED_STATE_DTYPES,
    )  # fmt: skip
    return "cpu-chunked" if native is None else "cpu-native"


def _native_for(
    device: torch.device,
    param_dtype: torch.dtype,
    *,
    master: bool,
    stochastic_rounding: bool,
    compressed_state: bool = False,
) -> ctypes.CDLL | None:
    """The native loop where it runs such a state (one decision for both callers).
    ``compressed_state``: bf16 or uint8 state (fp32, bf16 and fp16 params)."""
    if device.type != "cpu" or (param_dtype not in _NATIVE_DTYPES and param_dtype not in _NATIVE_KINDS):
        return None
    if compressed_state and param_dtype not in _NATIVE_BF16_STATE_KINDS:
        return None
    library = native_library()
    if library is not None and param_dtype == torch.float16 and not _native_f16:
        return None  # a compiler without _Float16 (see the C source)
    return library


@torch.compiler.disable
def adadelta_step_cpu_(
    table: SegmentTable,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    hparams: torch.Tensor,
    master: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    square_avg_scale: torch.Tensor | None = None,
    acc_delta_scale: torch.Tensor | None = None,
) -> None:
    """Apply one AdaDelta step in place to every piece of ``table``, without Triton.

    The arguments and their meaning are those of
    :func:`triton_adadelta.kernels.adadelta.adadelta_step_`. fp32 and fp64 CPU
    states run the fused C loop in one call; the others run chunked torch ops
    (:func:`implementation` names which). Step counts are the optimizer's business.

    Args:
        table: the pieces: addresses of params and grads, state offsets, lengths and
            hyper-parameter rows (:class:`~triton_adadelta.kernels.adadelta.SegmentTable`).
        square_avg, acc_delta: the flat state, fp32 (fp64 for fp64 params), bf16
            (rounded stochastically), or uint8 codes (block-quantized, with the two
            scale buffers); updated in place.
        hparams: ``[n_groups, N_HPARAMS]`` in the compute dtype (lr, rho, 1 - rho,
            eps, weight decay, maximize, lr is a tensor).
        master: optional flat fp32 master copy of low-precision params.
        stochastic_rounding: round low-precision param stores stochastically.
        seed: seed of the stochastic rounding.
        grad_scale: optional 1-element tensor the gradient is divided by.
        found_inf: optional 1-element tensor; when non-zero nothing changes.
        square_avg_scale, acc_delta_scale: uint8 state only (and then both): one fp32
            scale per QUANT_BLOCK (256) elements of ``square_avg`` and ``acc_delta``,
            ``[n_state // 256]``; updated in place. Every piece must start at a
            multiple of 256 elements of the state.

    Raises:
        ValueError: if the buffers, the table and the hyper-parameters do not fit together.
    """
    check_launch(
        table, square_avg, acc_delta, hparams, master, stochastic_rounding, grad_scale, found_inf,
        square_avg_scale=square_avg_scale, acc_delta_scale=acc_delta_scale,
    )  # fmt: skip
    if table.n_pieces == 0 or square_avg.numel() == 0 or square_avg.device.type == "meta":
        # Nothing to update: meta tensors hold no values, and a state of empty params
        # only has no buffer address (the C loop refuses a null master or scale).
        return
    library = _native_for(
        square_avg.device, table.param_dtype, master=master is not None, stochastic_rounding=stochastic_rounding,
        compressed_state=square_avg.dtype in _COMPRESSED_STATE_DTYPES,
    )  # fmt: skip
    if library is not None:
        _native_step_(
            library, table, square_avg, acc_delta, hparams, grad_scale, found_inf,
            use_torch_sqrt=matches_torch_sqrt(), master=master, stochastic_rounding=stochastic_rounding, seed=seed,
            square_avg_scale=square_avg_scale, acc_delta_scale=acc_delta_scale,
        )  # fmt: skip
        return
    _chunked_step_(
        table, square_avg, acc_delta, hparams, master, stochastic_rounding, seed, grad_scale, found_inf,
        square_avg_scale=square_avg_scale, acc_delta_scale=acc_delta_scale,
    )  # fmt: skip
