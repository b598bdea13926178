"""The CPU path: the AdaDelta update over the same flat buffers, without Triton.

This is the update for CPU tensors (and any device Triton does not run on) when
``TRITON_INTERPRET`` is not set. It takes the same arguments as the Triton
launcher, :func:`triton_adadelta.kernels.adadelta_step_`, and follows the same
equations in the same order (see that module's docstring).

Two implementations, chosen per call:

* **native** (fp32 and fp64 buffers on the CPU): one fused C loop, compiled once
  per machine with the system C compiler and cached on disk, then called through
  ``ctypes`` (which releases the GIL). It reads ``p g v u`` once and writes
  ``p v u`` once, the 28 B/param floor for fp32, and splits large buffers across
  ``torch.get_num_threads()`` threads. Every operation rounds as the corresponding
  eager torch op does on this CPU (torch's ``add(alpha=)`` and ``addcmul`` are fused
  multiply-adds, everything else rounds once per op). Its sqrt is the correctly
  rounded one, as in the Triton kernel; with ``TRITON_ADADELTA_CPU_SQRT=torch`` it
  calls torch's own sqrt and is bit-identical to ``torch.optim.Adadelta``
  (:func:`matches_torch_sqrt`). The first call in a fresh
  cache compiles for about 3 s; later processes load the cached library
  (:mod:`triton_adadelta.native_build`).
* **chunked** (everything else: bf16/fp16 params, master weights, stochastic
  rounding, other devices, or no C compiler): torch ops walked over cache-sized
  chunks, so each chunk is read from memory once and the dozen ops of the update
  then run on data still in cache. Set ``TRITON_ADADELTA_NATIVE_CPU=0`` to force it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from .native_build import cpu_model, load_cached

# Elements per chunk of the chunked path: 64K fp32 elements is 256 KiB per buffer,
# so the chunk's p, g, v, u and three scratch buffers stay within a 2 MiB L2.
# (Not re-tuned: fp32/fp64 take the native loop; this path serves the other modes.)
CHUNK_ELEMENTS = 1 << 16

# Below this many elements the native loop runs on the calling thread only: starting
# a thread costs ~20 us, more than a 256K-element update saves by splitting.
NATIVE_PARALLEL_MIN_ELEMENTS = 1 << 18

# The fused update in C. `fma` is used exactly where eager torch's CPU kernels use a
# fused multiply-add (`add(alpha=)` and `addcmul`); the library is compiled with
# -ffp-contract=off so that no other multiply-add is contracted, and sqrt and
# division are the IEEE ones, so every value rounds as in torch.optim.Adadelta.
_NATIVE_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define FLAG_GRAD_SCALE 1
#define FLAG_MAXIMIZE 2
#define FLAG_WEIGHT_DECAY 4
#define FLAG_LR_TENSOR 8

/* Elements per block: the block's g, sqrt inputs and outputs stay in L1 (256 was
   fastest of 256, 1024 and 4096 in a 16M-element step on this machine). */
#define BLOCK 256

/* torch's CPU sqrt is MKL VML's vmsSqrt/vmdSqrt (mode HA | FTZDAZ_OFF |
   ERRMODE_IGNORE), which is not always correctly rounded: call the same function,
   found in libtorch_cpu by the caller, on each block. NULL: the C library's sqrt. */
typedef void (*vml_sqrt_f32)(int n, const float *a, float *r, long long mode);
typedef void (*vml_sqrt_f64)(int n, const double *a, double *r, long long mode);
static vml_sqrt_f32 torch_sqrt_f32 = 0;
static vml_sqrt_f64 torch_sqrt_f64 = 0;
static const long long vml_mode = 0x2 | 0x140000 | 0x100;

void set_sqrt(void *sqrt_f32, void *sqrt_f64) {
    torch_sqrt_f32 = (vml_sqrt_f32)sqrt_f32;
    torch_sqrt_f64 = (vml_sqrt_f64)sqrt_f64;
}

static void sqrt_block_f32(int n, float *x, int use_torch_sqrt) {
    if (use_torch_sqrt && torch_sqrt_f32) torch_sqrt_f32(n, x, x, vml_mode);
    else for (int i = 0; i < n; ++i) x[i] = sqrtf(x[i]);
}

static void sqrt_block_f64(int n, double *x, int use_torch_sqrt) {
    if (use_torch_sqrt && torch_sqrt_f64) torch_sqrt_f64(n, x, x, vml_mode);
    else for (int i = 0; i < n; ++i) x[i] = sqrt(x[i]);
}

#define DEFINE_UPDATE(T, SUFFIX, FMA)                                                 \
typedef struct {                                                                      \
    T *param; const T *grad; T *square_avg; T *acc_delta;                             \
    int64_t start, end;                                                               \
    T lr, rho, one_minus_rho, eps, weight_decay, grad_scale;                          \
    int flags, use_torch_sqrt;                                                        \
} args_##SUFFIX;                                                                      \
                                                                                      \
static inline __attribute__((always_inline)) void update_##SUFFIX(                    \
        const args_##SUFFIX *a, const int flags) {                                    \
    T *restrict param = a->param; const T *restrict grad = a->grad;                   \
    T *restrict square_avg = a->square_avg; T *restrict acc_delta = a->acc_delta;     \
    const T lr = a->lr, rho = a->rho, one_minus_rho = a->one_minus_rho;               \
    const T eps = a->eps, weight_decay = a->weight_decay, grad_scale = a->grad_scale; \
    T g_block[BLOCK] __attribute__((aligned(64)));                                    \
    T std[BLOCK] __attribute__((aligned(64)));                                        \
    T delta[BLOCK] __attribute__((aligned(64)));                                      \
    for (int64_t first = a->start; first < a->end; first += BLOCK) {                  \
        const int n = a->end - first < BLOCK ? (int)(a->end - first) : BLOCK;         \
        T *restrict p = param + first; const T *restrict gr = grad + first;           \
        T *restrict v = square_avg + first; T *restrict u = acc_delta + first;        \
        for (int i = 0; i < n; ++i) {                                                 \
            T g = gr[i];                                                              \
            if (flags & FLAG_GRAD_SCALE) g = g / grad_scale;                          \
            if (flags & FLAG_MAXIMIZE) g = -g;                                        \
            if (flags & FLAG_WEIGHT_DECAY) g = FMA(p[i], weight_decay, g);            \
            const T square = FMA(one_minus_rho * g, g, v[i] * rho);                   \
            v[i] = square;                                                            \
            g_block[i] = g;                                                           \
            std[i] = square + eps;                                                    \
            delta[i] = u[i] + eps;                                                    \
        }                                                                             \
        sqrt_block_##SUFFIX(n, std, a->use_torch_sqrt);                               \
        sqrt_block_##SUFFIX(n, delta, a->use_torch_sqrt);                             \
        for (int i = 0; i < n; ++i) {                                                 \
            const T d = delta[i] / std[i] * g_block[i];                               \
            u[i] = FMA(one_minus_rho * d, d, u[i] * rho);                             \
            if (flags & FLAG_LR_TENSOR) p[i] = p[i] - d * lr;                         \
            else p[i] = FMA(d, -lr, p[i]);                                            \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* One loop per flag combination, so that each is vectorized without branches. */   \
static void *run_##SUFFIX(void *arg) {                                                \
    const args_##SUFFIX *a = (const args_##SUFFIX *)arg;                              \
    switch (a->flags) {                                                               \
        case 0: update_##SUFFIX(a, 0); break;   case 1: update_##SUFFIX(a, 1); break; \
        case 2: update_##SUFFIX(a, 2); break;   case 3: update_##SUFFIX(a, 3); break; \
        case 4: update_##SUFFIX(a, 4); break;   case 5: update_##SUFFIX(a, 5); break; \
        case 6: update_##SUFFIX(a, 6); break;   case 7: update_##SUFFIX(a, 7); break; \
        case 8: update_##SUFFIX(a, 8); break;   case 9: update_##SUFFIX(a, 9); break; \
        case 10: update_##SUFFIX(a, 10); break; case 11: update_##SUFFIX(a, 11); break;\
        case 12: update_##SUFFIX(a, 12); break; case 13: update_##SUFFIX(a, 13); break;\
        case 14: update_##SUFFIX(a, 14); break; default: update_##SUFFIX(a, 15); break;\
    }                                                                                 \
    return 0;                                                                         \
}                                                                                     \
                                                                                      \
/* lr_ptr, grad_scale_ptr, found_inf_ptr: 1-element tensors (NULL: not given), read  \
   here so that Python never reads a tensor's value: step() stays free of host reads. \
   Returns 1 when found_inf is set: nothing was written. */                          \
int adadelta_step_##SUFFIX(T *param, const T *grad, T *square_avg, T *acc_delta,      \
        int64_t n_elements, T lr, T rho, T one_minus_rho, T eps, T weight_decay,      \
        const T *lr_ptr, const T *grad_scale_ptr, const T *found_inf_ptr,             \
        int flags, int n_threads, int use_torch_sqrt) {                               \
    args_##SUFFIX args[64];                                                           \
    if (found_inf_ptr && *found_inf_ptr != 0) return 1;                               \
    if (lr_ptr) lr = *lr_ptr;                                                         \
    const T grad_scale = grad_scale_ptr ? *grad_scale_ptr : (T)1;                     \
    pthread_t threads[64];                                                            \
    int started[64] = {0};                                                            \
    if (n_threads < 1) n_threads = 1;                                                 \
    if (n_threads > 64) n_threads = 64;                                               \
    /* Shares are whole 64-byte lines so that no two threads write one line. */       \
    const int64_t line = 64 / (int64_t)sizeof(T);                                     \
    int64_t share = (n_elements + n_threads - 1) / n_threads;                         \
    share = (share + line - 1) / line * line;                                         \
    for (int t = 0; t < n_threads; ++t) {                                             \
        args_##SUFFIX *a = &args[t];                                                  \
        a->param = param; a->grad = grad;                                             \
        a->square_avg = square_avg; a->acc_delta = acc_delta;                         \
        a->start = t * share < n_elements ? t * share : n_elements;                   \
        a->end = a->start + share < n_elements ? a->start + share : n_elements;       \
        a->lr = lr; a->rho = rho; a->one_minus_rho = one_minus_rho; a->eps = eps;     \
        a->weight_decay = weight_decay; a->grad_scale = grad_scale;                   \
        a->flags = flags & 15; a->use_torch_sqrt = use_torch_sqrt;                    \
    }                                                                                 \
    for (int t = 1; t < n_threads; ++t)                                               \
        started[t] = args[t].start < args[t].end                                      \
            && pthread_create(&threads[t], 0, run_##SUFFIX, &args[t]) == 0;           \
    run_##SUFFIX(&args[0]);                                                           \
    for (int t = 1; t < n_threads; ++t) {                                             \
        if (started[t]) pthread_join(threads[t], 0);                                  \
        else run_##SUFFIX(&args[t]);  /* no thread could be started: run it here */   \
    }                                                                                 \
    return 0;                                                                         \
}

DEFINE_UPDATE(float, f32, fmaf)
DEFINE_UPDATE(double, f64, fma)
"""

# -ffp-contract=off: only the explicit fma() calls fuse (see above). -fno-math-errno
# lets sqrt vectorize; it changes no value. No -ffast-math: it would reassociate.
_NATIVE_CFLAGS = [
    "-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-math-errno",
    "-fPIC", "-shared", "-pthread",
]  # fmt: skip

_FLAG_GRAD_SCALE = 1
_FLAG_MAXIMIZE = 2
_FLAG_WEIGHT_DECAY = 4
_FLAG_LR_TENSOR = 8

_native_lock = threading.Lock()
_native_library: ctypes.CDLL | None = None
_native_tried = False
# The self-check of the torch-sqrt mode: None until run, then its verdict.
_torch_sqrt_checked: bool | None = None


def _build_native_library() -> ctypes.CDLL | None:
    """Compile (or load from the cache) the fused loop; None if it cannot be built."""
    # -march=native code is only valid on this kind of CPU: the cache is keyed on it.
    library = load_cached(
        "adadelta_cpu", _NATIVE_SOURCE, language="c", flags=[*_NATIVE_CFLAGS, "-lm"], key_extra=cpu_model(),
        loader=ctypes.CDLL,
    )  # fmt: skip
    if library is None:
        return None
    for suffix, scalar in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        function = getattr(library, f"adadelta_step_{suffix}")
        function.restype = ctypes.c_int
        function.argtypes = (
            [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [scalar] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        )
    library.set_sqrt.restype = None
    library.set_sqrt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.set_sqrt(*_torch_vml_sqrt())
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


def _native_matches_torch(library: ctypes.CDLL) -> bool:
    """Self-check: the native loop gives the chunked torch ops' bits on awkward data.

    Run once per process; a mismatch (an unexpected sqrt, a compiler that contracts)
    switches the native loop off instead of changing results.
    """
    generator = torch.Generator().manual_seed(0)
    n_elements = 3 * 1024 + 5  # several blocks and a ragged tail
    for dtype in (torch.float32, torch.float64):
        for flags in range(16):
            maximize = bool(flags & _FLAG_MAXIMIZE)
            weight_decay = 0.01 if flags & _FLAG_WEIGHT_DECAY else 0.0
            lr: float | torch.Tensor = torch.tensor(0.7) if flags & _FLAG_LR_TENSOR else 0.7
            grad_scale = torch.tensor(3.0) if flags & _FLAG_GRAD_SCALE else None
            magnitude = torch.exp(torch.randn(n_elements, generator=generator, dtype=torch.float64) * 4)
            buffers = [
                torch.randn(n_elements, generator=generator, dtype=dtype),
                (torch.randn(n_elements, generator=generator, dtype=torch.float64) * magnitude).to(dtype),
                torch.rand(n_elements, generator=generator, dtype=dtype) * magnitude.to(dtype),
                torch.rand(n_elements, generator=generator, dtype=dtype) * 1e-3,
            ]
            expected = [buffer.clone() for buffer in buffers]
            hparams = dict(lr=lr, rho=0.9, eps=1e-6, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale)
            _native_step_(library, *buffers, **hparams, use_torch_sqrt=True)
            _chunked_step_(*expected, master=None, stochastic_rounding=False, seed=0, **hparams)
            if not all(torch.equal(a, b) for a, b in zip(buffers, expected)):
                return False
    return True


def native_library() -> ctypes.CDLL | None:
    """The compiled fused loop, built on first use; None where there is no C compiler.

    ``TRITON_ADADELTA_NATIVE_CPU=0`` switches it off (the chunked torch path runs).
    """
    global _native_library, _native_tried, _torch_sqrt_checked
    if os.environ.get("TRITON_ADADELTA_NATIVE_CPU", "1") == "0":
        return None
    if not _native_tried:
        with _native_lock:
            if not _native_tried:
                _native_library = _build_native_library()
                _native_tried = True
    if _native_library is not None and matches_torch_sqrt() and _torch_sqrt_checked is None:
        with _native_lock:
            if _torch_sqrt_checked is None:
                _torch_sqrt_checked = _native_matches_torch(_native_library)
    if matches_torch_sqrt() and not _torch_sqrt_checked:
        return None
    return _native_library


def _native_fits(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    master: torch.Tensor | None,
    stochastic_rounding: bool,
    lr: float | torch.Tensor,
    grad_scale: torch.Tensor | None,
) -> bool:
    """Whether the native loop can run these buffers (fp32/fp64 on the CPU, contiguous)."""
    if master is not None or stochastic_rounding or param.dtype not in (torch.float32, torch.float64):
        return False
    for tensor in (param, grad, square_avg, acc_delta):
        if tensor.device.type != "cpu" or tensor.dtype != param.dtype or not tensor.is_contiguous():
            return False
    for scalar in (lr, grad_scale):
        if isinstance(scalar, torch.Tensor) and scalar.device.type != "cpu":
            return False
    return True


def _scalar_pointer(value: torch.Tensor | None, dtype: torch.dtype) -> tuple[int | None, torch.Tensor | None]:
    """A pointer to a 1-element tensor of ``dtype`` (and the tensor, to keep it alive)."""
    if value is None:
        return None, None
    value = value.to(dtype).contiguous()
    return value.data_ptr(), value


def rounds_to_nonzero(value: float, dtype: torch.dtype) -> bool:
    """Whether a Python scalar is non-zero once rounded to ``dtype`` (no tensor made).

    Weight decay applies when it is non-zero as the update sees it: 1e-308 is 0 in
    fp32, and must not turn an inf param's grad into NaN through 0 * inf.
    """
    if dtype == torch.float64:
        return value != 0
    return ctypes.c_float(value).value != 0


def _native_step_(
    library: ctypes.CDLL,
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None = None,
    use_torch_sqrt: bool | None = None,
) -> None:
    n_elements = param.numel()
    dtype = param.dtype
    flags = 0
    if grad_scale is not None:
        flags |= _FLAG_GRAD_SCALE
    if maximize:
        flags |= _FLAG_MAXIMIZE
    if rounds_to_nonzero(weight_decay, dtype):
        flags |= _FLAG_WEIGHT_DECAY
    lr_pointer, lr_tensor = _scalar_pointer(lr if isinstance(lr, torch.Tensor) else None, dtype)
    if lr_tensor is not None:
        flags |= _FLAG_LR_TENSOR
    scale_pointer, scale_tensor = _scalar_pointer(grad_scale, dtype)
    inf_pointer, inf_tensor = _scalar_pointer(found_inf, dtype)
    n_threads = torch.get_num_threads() if n_elements >= NATIVE_PARALLEL_MIN_ELEMENTS else 1
    function = library.adadelta_step_f32 if dtype == torch.float32 else library.adadelta_step_f64
    if use_torch_sqrt is None:
        use_torch_sqrt = matches_torch_sqrt()
    # Scalars are rounded to the buffer's dtype by ctypes, as ATen rounds a Python
    # scalar to the tensor's dtype; 1 - rho is formed in double first, as torch does.
    function(
        param.data_ptr(), grad.data_ptr(), square_avg.data_ptr(), acc_delta.data_ptr(),
        n_elements, 0.0 if lr_tensor is not None else lr, rho, 1 - rho, eps, weight_decay,
        lr_pointer, scale_pointer, inf_pointer, flags, n_threads, int(use_torch_sqrt),
    )  # fmt: skip


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
    out.copy_(torch.where(noise < fraction, other, nearest))


def adadelta_step_torch_(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    master: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdaDelta step in place on flat buffers, without Triton.

    Takes the arguments of :func:`triton_adadelta.kernels.adadelta_step_`. fp32 and
    fp64 CPU buffers run the native fused loop when a C compiler is available; all
    other cases run the chunked torch ops.
    """
    # found_inf is never read on the host: the steps advance by (found_inf == 0) and
    # the updates below mask themselves, so step() needs no sync on any device.
    if found_inf is None:
        step.add_(1)
    else:
        step.add_((found_inf == 0).to(step.dtype))
    if _native_fits(param, grad, square_avg, acc_delta, master, stochastic_rounding, lr, grad_scale):
        library = native_library()
        if library is not None:
            _native_step_(
                library, param, grad, square_avg, acc_delta,
                lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
            return
    _chunked_step_(
        param, grad, square_avg, acc_delta,
        lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
        master=master, stochastic_rounding=stochastic_rounding, seed=seed, grad_scale=grad_scale,
        found_inf=found_inf,
    )  # fmt: skip


def _chunked_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    master: torch.Tensor | None,
    stochastic_rounding: bool,
    seed: int,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The update as torch ops, one cache-sized chunk at a time (steps not advanced)."""
    compute_dtype = square_avg.dtype
    n_elements = param.numel()
    chunk = max(1, min(n_elements, CHUNK_ELEMENTS))
    scratch = [torch.empty(chunk, dtype=compute_dtype, device=param.device) for _ in range(4)]
    grad_scratch, std_scratch, delta_scratch, weight_scratch = scratch
    generator = None
    if stochastic_rounding:
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    has_weight_decay = rounds_to_nonzero(weight_decay, compute_dtype)
    # With found_inf, each chunk's old values are put back where it is set (a device
    # op, not a host read of found_inf).
    skip = None if found_inf is None else (found_inf != 0).to(param.device)

    for start in range(0, n_elements, chunk):
        end = min(start + chunk, n_elements)
        size = end - start
        param_chunk = param[start:end]
        # The fp32 (fp64) copy of the params that the update is applied to.
        if master is not None:
            weights = master[start:end]
        elif param.dtype == compute_dtype:
            weights = param_chunk
        else:
            weights = weight_scratch[:size].copy_(param_chunk)

        square_avg_chunk = square_avg[start:end]
        acc_delta_chunk = acc_delta[start:end]
        written = [square_avg_chunk, acc_delta_chunk, param_chunk] + ([weights] if master is not None else [])
        saved = [tensor.clone() for tensor in written] if skip is not None else []

        g = grad[start:end]
        if g.dtype != compute_dtype:
            g = grad_scratch[:size].copy_(g)
        if grad_scale is not None:
            g = torch.div(g, grad_scale, out=grad_scratch[:size])
        if maximize:
            g = torch.neg(g, out=grad_scratch[:size])
        if has_weight_decay:
            g = torch.add(g, weights, alpha=weight_decay, out=grad_scratch[:size])

        square_avg_chunk.mul_(rho).addcmul_(g, g, value=1 - rho)
        std = torch.add(square_avg_chunk, eps, out=std_scratch[:size]).sqrt_()
        delta = torch.add(acc_delta_chunk, eps, out=delta_scratch[:size]).sqrt_()
        delta.div_(std).mul_(g)
        acc_delta_chunk.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        if lr_is_tensor:
            weights.sub_(delta.mul_(lr))
        else:
            weights.add_(delta, alpha=-lr)

        if weights is not param_chunk:
            if stochastic_rounding:
                noise = torch.rand(size, generator=generator, device=param.device)
                stochastic_round_(param_chunk, weights, noise)
            else:
                param_chunk.copy_(weights)
        for tensor, old in zip(written, saved):
            torch.where(skip, old, tensor, out=tensor)
