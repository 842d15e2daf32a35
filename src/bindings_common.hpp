// Pieces shared by the binding files: NumPy views of mapped tensors.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <vector>

#include "meswitch/mapped_file.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch::bindings {

namespace py = pybind11;

// NumPy dtype with the same storage; BF16 comes out as uint16 and Python reinterprets it.
inline py::dtype numpy_storage_dtype(DType dtype) {
  switch (dtype) {
    case DType::F32: return py::dtype::of<float>();
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype::of<std::uint16_t>();
    case DType::I32: return py::dtype::of<std::int32_t>();
    case DType::U8: return py::dtype::of<std::uint8_t>();
    case DType::U32: return py::dtype::of<std::uint32_t>();
  }
  throw Error("invalid dtype");
}

// A read-only NumPy array viewing `view`, keeping `mapping` alive through its base.
// Misaligned views (possible in foreign files) are copied instead.
inline py::array mapped_array(const std::shared_ptr<MappedFile>& mapping, const TensorView& view) {
  if (reinterpret_cast<std::uintptr_t>(view.data) % dtype_size(view.dtype) != 0) {
    py::array copy(numpy_storage_dtype(view.dtype), view.shape);
    std::memcpy(copy.mutable_data(), view.data, view.nbytes());
    return copy;
  }
  auto* owner = new std::shared_ptr<MappedFile>(mapping);
  py::capsule base(owner, [](void* pointer) { delete static_cast<std::shared_ptr<MappedFile>*>(pointer); });
  std::vector<py::ssize_t> strides;
  for (std::int64_t stride : view.strides) strides.push_back(py::ssize_t(stride * dtype_size(view.dtype)));
  py::array array(numpy_storage_dtype(view.dtype), view.shape, strides, view.data, base);
  py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return array;
}

}  // namespace meswitch::bindings
