"""Notice, in one compiled pass, whether a flat buffer's params changed under it.

Every ``step()`` must know whether a param's data was replaced (``p.data = ...``,
``model.to(...)``), whether each grad is still the flat grad buffer's view, and,
with master weights, whether a param was written in place. Asking each param from
Python costs about 60 ns per attribute per param: 250 us a step on 1,000 params.
A :class:`ParamWatch` asks the params' ``TensorImpl`` objects directly instead, in a
C++ loop that reads a few words per param and compares them with a snapshot.

The library is compiled on first use against the installed torch's headers (under
2 s here, measured by ``perf/bench_step.py``), then cached on disk for that torch
build. Where it cannot be built (no C++ compiler, no headers) or
``TRITON_ADADELTA_NATIVE_WATCH=0``, :func:`param_watch` returns None and the flat
buffer asks from Python, with the same answers.

Lifetime: the watch holds a reference to each param's ``TensorImpl``, so the
pointers it reads stay valid. ``p.data = ...`` keeps the ``TensorImpl`` (it is the
data pointer that changes, and the watch sees it). ``torch.utils.swap_tensors``,
which would give the Python param another ``TensorImpl``, refuses a tensor that
C++ holds a reference to, so it cannot happen behind the watch's back.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Sequence

import torch

from .native_build import load_cached

__all__ = ["ParamWatch", "param_watch", "DATA", "GRAD", "GRAD_REQUIRES_GRAD", "VERSION", "UNKNOWN"]

# What changed since the snapshot (bits of ParamWatch.changes()).
DATA = 1  # a param's data pointer: its data was replaced
GRAD = 2  # a param's grad is another tensor (or None, or not None), or its data moved
VERSION = 4  # a param's version counter: it was written in place
UNKNOWN = 8  # a param the loop could not read (no storage, an inference tensor): ask Python
GRAD_REQUIRES_GRAD = 16  # (asked with GRAD) a grad requires grad: it has autograd history

_WATCH_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int DATA = 1, GRAD = 2, VERSION = 4, UNKNOWN = 8, GRAD_REQUIRES_GRAD = 16;

// One param at the snapshot.
struct Seen {
    const void *data;
    const c10::TensorImpl *grad;
    const void *grad_data;
    int64_t version;
};

const c10::TensorImpl *grad_of(const c10::TensorImpl *param) {
    const c10::AutogradMetaInterface *meta = param->autograd_meta();
    if (meta == nullptr) return nullptr;
    const at::Tensor &grad = meta->grad();
    return grad.defined() ? grad.unsafeGetTensorImpl() : nullptr;
}

}  // namespace

extern "C" {

// Hold (or let go of) a reference to each param's TensorImpl.
void watch_hold(int64_t n, c10::TensorImpl *const *params) {
    for (int64_t i = 0; i < n; ++i) c10::raw::intrusive_ptr::incref(params[i]);
}

void watch_release(int64_t n, c10::TensorImpl *const *params) {
    for (int64_t i = 0; i < n; ++i) c10::raw::intrusive_ptr::decref(params[i]);
}

// Record the params as they are now. Returns UNKNOWN if one could not be read.
int watch_snapshot(int64_t n, c10::TensorImpl *const *params, Seen *seen, int versions) {
    try {
        for (int64_t i = 0; i < n; ++i) {
            const c10::TensorImpl *param = params[i];
            const c10::TensorImpl *grad = grad_of(param);
            seen[i].data = param->data();
            seen[i].grad = grad;
            seen[i].grad_data = grad != nullptr ? grad->data() : nullptr;
            seen[i].version = versions ? param->version_counter().current_version() : 0;
        }
    } catch (...) {
        return UNKNOWN;
    }
    return 0;
}

// Which of the `what` bits changed since the snapshot (0: nothing).
int watch_changes(int64_t n, c10::TensorImpl *const *params, const Seen *seen, int what) {
    int changed = 0;
    try {
        for (int64_t i = 0; i < n; ++i) {
            const c10::TensorImpl *param = params[i];
            if ((what & DATA) && param->data() != seen[i].data) changed |= DATA;
            if (what & GRAD) {
                const c10::TensorImpl *grad = grad_of(param);
                if (grad != seen[i].grad || (grad != nullptr && grad->data() != seen[i].grad_data))
                    changed |= GRAD;
                if ((what & GRAD_REQUIRES_GRAD) && grad != nullptr && grad->requires_grad())
                    changed |= GRAD_REQUIRES_GRAD;
            }
            if ((what & VERSION) && param->version_counter().current_version() != seen[i].version)
                changed |= VERSION;
            if (changed == what) break;
        }
    } catch (...) {
        return changed | UNKNOWN;
    }
    return changed;
}

// Bring each param's grad into the flat grad buffer, for a CPU buffer whose grads
// are fresh tensors (after zero_grad(set_to_none=True) and a backward). views[i] is
// the flat buffer's view for param i, at view_data[i]. status[i]: 0 no grad, 1 the
// view already, 2 a plain grad (CPU, dense, strided, contiguous, the view's dtype
// and shape, no conj or neg bit, real data outside the flat grad buffer), copied
// into the view; 3 the same, for a grad that was already there at the snapshot (the
// last gather) and was left in place then. The caller may re-point status 2 grads.
// Returns how many were copied, or -1, having copied nothing, when a grad needs the
// Python path (to be refused with a clear error, or copied by torch).
int64_t watch_gather(int64_t n, c10::TensorImpl *const *params, const Seen *seen, c10::TensorImpl *const *views,
                     const int64_t *view_data, int8_t *status) {
    std::vector<const void *> sources(n, nullptr);
    int64_t copied = 0;
    try {
        for (int64_t i = 0; i < n; ++i) {
            const c10::TensorImpl *grad = grad_of(params[i]);
            const c10::TensorImpl *view = views[i];
            if (grad == nullptr) {
                status[i] = 0;
                continue;
            }
            if (view->data() != reinterpret_cast<const void *>(view_data[i])) return -1;
            if (grad == view) {
                status[i] = 1;
                continue;
            }
            const bool plain = grad->layout() == c10::kStrided && !grad->is_python_dispatch()
                && !grad->_is_zerotensor() && grad->has_storage()
                && grad->device_type() == c10::DeviceType::CPU && view->device_type() == c10::DeviceType::CPU
                && grad->dtype() == view->dtype() && grad->sizes().equals(view->sizes())
                && grad->is_contiguous() && !grad->is_conj() && !grad->is_neg();
            if (!plain) return -1;
            // A grad inside the flat grad buffer (another param's view) could be
            // overwritten by an earlier copy: torch's path clones it first.
            if (grad->storage().unsafeGetStorageImpl() == view->storage().unsafeGetStorageImpl()) return -1;
            sources[i] = grad->data();
            if (sources[i] == nullptr && grad->numel() > 0) return -1;
            status[i] = grad == seen[i].grad ? 3 : 2;
            ++copied;
        }
    } catch (...) {
        return -1;
    }
    // Only plain memory moves from here on: nothing can fail halfway.
    for (int64_t i = 0; i < n; ++i) {
        if (status[i] >= 2 && sources[i] != nullptr)
            std::memmove(reinterpret_cast<void *>(view_data[i]), sources[i], views[i]->numel() * views[i]->itemsize());
    }
    return copied;
}

}  // extern "C"
"""

_SEEN_WORDS = 4  # int64 words per param in the snapshot (struct Seen)

_lock = threading.Lock()
_library: ctypes.PyDLL | None = None
_tried = False


def _flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O2", "-std=c++17", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}", f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip


def _build() -> ctypes.PyDLL | None:
    # The headers fix TensorImpl's layout: the cache is keyed on the torch build.
    key = " ".join([torch.__version__, str(torch.version.git_version), torch.__file__])
    # PyDLL keeps the GIL: releasing a reference may release a Python object.
    library = load_cached(
        "adadelta_watch", _WATCH_SOURCE, language="c++", flags=_flags(), key_extra=key, loader=ctypes.PyDLL
    )
    if library is None:
        return None
    pointers, int64 = ctypes.c_void_p, ctypes.c_int64
    library.watch_hold.argtypes = library.watch_release.argtypes = [int64, pointers]
    library.watch_hold.restype = library.watch_release.restype = None
    library.watch_snapshot.argtypes = [int64, pointers, pointers, ctypes.c_int]
    library.watch_changes.argtypes = [int64, pointers, pointers, ctypes.c_int]
    library.watch_snapshot.restype = library.watch_changes.restype = ctypes.c_int
    library.watch_gather.argtypes = [int64, pointers, pointers, pointers, pointers, pointers]
    library.watch_gather.restype = int64
    return library


def watch_library() -> ctypes.PyDLL | None:
    """The compiled watcher, built on first use; None where it cannot be built or is off."""
    global _library, _tried
    if os.environ.get("TRITON_ADADELTA_NATIVE_WATCH", "1") == "0":
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _library = _build()
                _tried = True
    return _library


class ParamWatch:
    """A snapshot of params (data pointers, grads, versions) and the loop that compares it.

    Args:
        library: the compiled watcher (:func:`watch_library`).
        params: the params to watch; the watch holds their ``TensorImpl`` until it is
            garbage-collected.
        versions: also record version counters (for master weights).
    """

    def __init__(self, library: ctypes.PyDLL, params: Sequence[torch.Tensor], *, versions: bool) -> None:
        self._library = library
        self._n = len(params)
        # A tensor's _cdata is the address of its TensorImpl.
        self._params = (ctypes.c_void_p * self._n)(*(param._cdata for param in params))
        self._seen = (ctypes.c_int64 * (_SEEN_WORDS * self._n))()
        self._versions = int(versions)
        self._view_refs: tuple[torch.Tensor, ...] = ()
        self._views = (ctypes.c_void_p * self._n)()
        self._view_data = (ctypes.c_int64 * self._n)()
        self._status = (ctypes.c_int8 * self._n)()
        library.watch_hold(self._n, self._params)
        self._held = True

    def set_views(self, views: Sequence[torch.Tensor], view_data: Sequence[int]) -> None:
        """The flat grad buffer's view of each param, and where each view's data is.

        The watch keeps the views alive (their TensorImpls are read); :meth:`gather`
        checks each view's data.
        """
        self._view_refs = tuple(views)
        self._views[:] = [view._cdata for view in views]
        self._view_data[:] = view_data

    def gather(self) -> tuple[int, bytes]:
        """Copy fresh CPU grads into their views (see ``watch_gather`` above).

        Returns:
            How many grads were copied (-1: none, a grad needs the Python path), and
            each param's status: 0 no grad, 1 already the view, 2 copied into it, 3
            copied into it and the same grad as at the last snapshot.
        """
        copied = self._library.watch_gather(
            self._n, self._params, self._seen, self._views, self._view_data, self._status
        )
        return copied, bytes(self._status)

    def seen_grad(self, i: int) -> int:
        """The address of param ``i``'s grad ``TensorImpl`` at the snapshot (0: None)."""
        return self._seen[_SEEN_WORDS * i + 1]

    def snapshot(self) -> bool:
        """Record the params as they are now; False if one could not be read."""
        return self._library.watch_snapshot(self._n, self._params, self._seen, self._versions) == 0

    def changes(self, what: int) -> int:
        """Which of the ``what`` bits (DATA, GRAD, GRAD_REQUIRES_GRAD, VERSION) are set."""
        return self._library.watch_changes(self._n, self._params, self._seen, what)

    def __reduce__(self) -> object:
        # A copy would let go of references it never took.
        raise TypeError("a ParamWatch holds TensorImpl references and cannot be copied or pickled")

    def __del__(self) -> None:
        if getattr(self, "_held", False):
            self._held = False
            self._library.watch_release(self._n, self._params)


def param_watch(params: Sequence[torch.Tensor], *, versions: bool) -> ParamWatch | None:
    """A :class:`ParamWatch` over ``params`` with a first snapshot, or None (watch from Python)."""
    library = watch_library()
    if library is None:
        return None
    watch = ParamWatch(library, params, versions=versions)
    return watch if watch.snapshot() else None
