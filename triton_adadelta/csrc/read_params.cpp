// One pass over an optimizer's params: what FlatState.plan needs to know from each
// param and its grad, read through ATen's public API at C++ speed (a steady step's
// plan on 1000 params: 70 us with it, 435-541 us through Python; perf/bench_step.py,
// perf/results/reader_ab/).
// (Prefetching the chain of objects behind each tensor in earlier passes was tried:
// in a step that followed torch's own optimizers it made the pass slower.)
//
// Built once per machine against the installed torch's headers
// (triton_adadelta/reader.py); where it is not built, the same reads run in Python.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>

#include <cstring>

namespace {

// A tensor the kernel can reach through its address exactly as torch sees it.
bool by_address(const at::Tensor& tensor) {
  return tensor.layout() == c10::kStrided && tensor.has_storage() && !tensor.is_conj() && !tensor.is_neg() &&
         tensor.is_contiguous();
}

}  // namespace

// What triton_adadelta_read_params found (the caller's READ_* constants).
constexpr int64_t kSame = 0;             // the addresses `out` held already
constexpr int64_t kNewGrads = 1;         // other grad addresses, the same params'
constexpr int64_t kNewParams = 2;        // other param addresses
constexpr int64_t kIrregular = 3;        // + i: param i is a case for Python
constexpr int64_t kRaised = -1;          // ATen raised

// params: a list of torch tensors, all meant to be of one device and dtype.
// out: int64[2n] (int64[3n] with versions): the params' data pointers, then their
//   grads' data pointers, then the params' version counters. On entry it holds the
//   last call's pointers, which the return value compares with.
// table: a segment table (kernels/adadelta.py) over all n params, int64
//   [rows, 2n] row-major: its address rows are written from the same pointers. Piece
//   2i is param i's bulk, starting piece_bytes[2i] bytes in (0); piece 2i + 1 its
//   tail, piece_bytes[2i + 1] bytes in. A bulk is aligned when both its param and
//   grad start on a 16-byte vector; a tail never is.
// When every param is contiguous, of params[0]'s device and dtype, and has a
// contiguous grad of its own dtype, device and size, `out` and `table` are filled
// and kSame, kNewGrads or kNewParams returned. Else kIrregular + the index of the
// first param that is not so (or kRaised), with both partly overwritten: the caller
// reads that step in Python, which says what is wrong where something is.
extern "C" int64_t triton_adadelta_read_params(PyObject* params, int64_t* out, int64_t with_versions, int64_t* table,
                                               const int64_t* piece_bytes, int64_t param_row, int64_t grad_row,
                                               int64_t aligned_row) {
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (n == 0) return kSame;
  PyObject** items = &PyList_GET_ITEM(params, 0);
  try {
    bool new_params = false, new_grads = false;
    const at::Tensor& first = THPVariable_Unpack(items[0]);
    const c10::Device device = first.device();
    const c10::ScalarType dtype = first.scalar_type();
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& param = THPVariable_Unpack(items[i]);
      const at::Tensor& grad = param.grad();
      if (!by_address(param) || param.device() != device || param.scalar_type() != dtype || !grad.defined() ||
          !by_address(grad) || grad.scalar_type() != dtype || grad.device() != device ||
          grad.numel() != param.numel()) {
        return kIrregular + i;
      }
      // The kernel writes the param (a copy-on-write param is materialized, as by
      // any in-place op) and only reads the grad.
      const auto param_address = reinterpret_cast<int64_t>(param.mutable_data_ptr());
      const auto grad_address = reinterpret_cast<int64_t>(grad.const_data_ptr());
      new_params |= out[i] != param_address;
      new_grads |= out[n + i] != grad_address;
      out[i] = param_address;
      out[n + i] = grad_address;
      if (with_versions) out[2 * n + i] = static_cast<int64_t>(param._version());
      for (int64_t k = 0; k < 2; ++k) {
        table[param_row * 2 * n + 2 * i + k] = param_address + piece_bytes[2 * i + k];
        table[grad_row * 2 * n + 2 * i + k] = grad_address + piece_bytes[2 * i + k];
      }
      table[aligned_row * 2 * n + 2 * i] = ((param_address | grad_address) & 15) == 0;
    }
    return new_params ? kNewParams : new_grads ? kNewGrads : kSame;
  } catch (...) {
    return kRaised;
  }
}

// optimizer.zero_grad() over one param group's params, as torch's does it, without a
// Python attribute read per param (on 1000 small params the Python loop was most of
// zero_grad; the rest is freeing the grads).
// set_to_none: every param's grad is reset, as `param.grad = None` does.
// Else each grad that is defined is zeroed in place and its version bumped, as
// `grad.zero_()` does: by one memset where the grad is a dense contiguous CPU tensor
// with no autograd history (torch's zero_grad would first detach it) and no Python
// dispatch or inference-mode rules of its own.
// Every param is checked before anything changes. Returns 0 when done, kIrregular +
// i where param i (not a torch.Tensor or Parameter exactly, as a `__torch_function__`
// subclass is not, or its grad not as above) must take torch's own path, with nothing
// changed, or kRaised. The caller does not call it under a torch function mode.
extern "C" int64_t triton_adadelta_zero_grads(PyObject* params, int64_t set_to_none) {
  try {
    const Py_ssize_t n = PyList_GET_SIZE(params);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(item)) return kIrregular + i;
      if (set_to_none) continue;
      const at::Tensor& grad = THPVariable_Unpack(item).grad();
      if (grad.defined() && (!by_address(grad) || grad.device().type() != c10::DeviceType::CPU || grad.is_inference() ||
                             grad.requires_grad() ||  // (as any grad with autograd history does)
                             grad.unsafeGetTensorImpl()->is_python_dispatch() || grad.is_nested())) {
        return kIrregular + i;
      }
    }
    // Freeing a grad may run Python (a weakref callback, a subclass's __del__), so
    // each item is read from the list again and held while its grad goes.
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
      PyObject* item = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(item)) continue;  // (put there by a __del__)
      Py_INCREF(item);
      const at::Tensor& param = THPVariable_Unpack(item);
      if (set_to_none) {
        param.mutable_grad().reset();
      } else if (const at::Tensor& grad = param.grad(); grad.defined() && grad.numel() > 0) {
        std::memset(grad.mutable_data_ptr(), 0, grad.nbytes());
        grad.unsafeGetTensorImpl()->bump_version();
      } else if (grad.defined()) {
        grad.unsafeGetTensorImpl()->bump_version();
      }
      Py_DECREF(item);
    }
    return 0;
  } catch (...) {
    return kRaised;
  }
}

// `with torch.autograd.profiler.record_function(name):` around the optimizer's step()
// and zero_grad(), as torch's Optimizer wraps them, at the cost of one C call where
// nothing observes it. The Python context manager creates a scripted object through
// the dispatcher at every call, observed or not; on a cold cache that was 150-200 us
// of a 1000-param step. This asks for the same user-scope callbacks as the Python one
// (so a profiler, an observer or sampling sees the same event) and is a no-op when
// there are none. `name` must outlive the record (the caller keeps it).
extern "C" void* triton_adadelta_record_enter(const char* name) {
  try {
    auto callbacks = at::getStepCallbacksUnlessEmpty(at::RecordScope::USER_SCOPE);
    if (!callbacks) return nullptr;
    auto* record = new at::RecordFunction(std::move(*callbacks));
    if (record->isActive()) record->before(std::string_view(name));
    return record;
  } catch (...) {
    return nullptr;
  }
}

// Ends what triton_adadelta_record_enter began (its end callbacks run here).
extern "C" void triton_adadelta_record_exit(void* record) {
  try {
    delete static_cast<at::RecordFunction*>(record);
  } catch (...) {
  }
}
