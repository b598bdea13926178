// One pass over an optimizer's params: what FlatState.plan needs to know from each
// param and its grad, read through ATen's public API at C++ speed (about 40 ns a
// param, against about 1 us for the same reads through Python).
//
// Built once per machine against the installed torch's headers
// (triton_adadelta/reader.py); where it is not built, the same reads run in Python.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/core/Tensor.h>

namespace {

// A tensor the kernel can reach through its address exactly as torch sees it.
bool by_address(const at::Tensor& tensor) {
  return tensor.layout() == c10::kStrided && tensor.has_storage() && !tensor.is_conj() && !tensor.is_neg() &&
         tensor.is_contiguous();
}

// params: a list of torch tensors, all meant to be of one device and dtype.
// out: int64[2n] (int64[3n] with versions): the params' data pointers, then their
//   grads' data pointers, then the params' version counters.
// Returns 0 when every param is contiguous, of params[0]'s device and dtype, and has
// a contiguous grad of its own dtype, device and size: then `out` is filled. Else
// 1 + the index of the first param that is not so (-1: ATen raised); the caller
// then reads that case in Python, which says what is wrong where something is.
// Issues the loads of the next pass early. Each tensor is a chain of objects (the
// Python object, its TensorImpl, its autograd meta, the grad's TensorImpl, their
// storages); after a big copy or a forward pass none of them is in cache, and read
// one chain at a time the step would wait for ~10 memory round trips per param.
// Walking all chains one link per pass keeps many of those loads in flight at once.
inline void prefetch(const void* address) {
  __builtin_prefetch(address);
  __builtin_prefetch(static_cast<const char*>(address) + 64);
}

void prefetch_storage(const c10::TensorImpl* impl) {
  if (impl->has_storage()) prefetch(impl->storage().unsafeGetStorageImpl());
}

}  // namespace

// params: a list of torch tensors, all meant to be of one device and dtype.
// out: int64[2n] (int64[3n] with versions): the params' data pointers, then their
//   grads' data pointers, then the params' version counters.
// Returns 0 when every param is contiguous, of params[0]'s device and dtype, and has
// a contiguous grad of its own dtype, device and size: then `out` is filled. Else
// 1 + the index of the first param that is not so (-1: ATen raised); the caller
// then reads that case in Python, which says what is wrong where something is.
extern "C" int64_t triton_adadelta_read_params(PyObject* params, int64_t* out, int64_t with_versions) {
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (n == 0) return 0;
  PyObject** items = &PyList_GET_ITEM(params, 0);
  try {
    // The prefetching passes keep their pointers in `out`, overwritten at the end.
    for (Py_ssize_t i = 0; i < n; ++i) prefetch(items[i]);
    for (Py_ssize_t i = 0; i < n; ++i) {
      c10::TensorImpl* impl = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
      out[i] = reinterpret_cast<int64_t>(impl);
      prefetch(impl);
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      const auto* impl = reinterpret_cast<const c10::TensorImpl*>(out[i]);
      prefetch_storage(impl);
      if (impl->autograd_meta() != nullptr) prefetch(impl->autograd_meta());
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
      const c10::TensorImpl* grad_impl = grad.defined() ? grad.unsafeGetTensorImpl() : nullptr;
      out[n + i] = reinterpret_cast<int64_t>(grad_impl);
      if (grad_impl != nullptr) prefetch(grad_impl);
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (out[n + i] != 0) prefetch_storage(reinterpret_cast<const c10::TensorImpl*>(out[n + i]));
    }

    const at::Tensor& first = THPVariable_Unpack(items[0]);
    const c10::Device device = first.device();
    const c10::ScalarType dtype = first.scalar_type();
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& param = THPVariable_Unpack(items[i]);
      const at::Tensor& grad = param.grad();
      if (!by_address(param) || param.device() != device || param.scalar_type() != dtype || !grad.defined() ||
          !by_address(grad) || grad.scalar_type() != dtype || grad.device() != device ||
          grad.numel() != param.numel()) {
        return i + 1;
      }
      // The kernel writes the param (a copy-on-write param is materialized, as by
      // any in-place op) and only reads the grad.
      out[i] = reinterpret_cast<int64_t>(param.mutable_data_ptr());
      out[n + i] = reinterpret_cast<int64_t>(grad.const_data_ptr());
      if (with_versions) out[2 * n + i] = static_cast<int64_t>(param._version());
    }
  } catch (...) {
    return -1;
  }
  return 0;
}
