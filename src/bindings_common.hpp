// Pieces shared by the binding files: the one NumPy <-> DType mapping, NumPy views of
// memory meswitch keeps alive, and borrowed host tensors from Python objects.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/dlpack.hpp"
#include "meswitch/error.hpp"
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

// The DType of a NumPy dtype (ml_dtypes.bfloat16 included); false for the rest.
// `u16_as_f16`: a uint16 array holds f16 bit patterns.
inline bool dtype_of_numpy(const py::dtype& dtype, DType& out, bool u16_as_f16 = false) {
  const char kind = dtype.kind();
  const auto size = dtype.itemsize();
  if (kind == 'f' && size == 4) out = DType::F32;
  else if (kind == 'f' && size == 2) out = DType::F16;
  else if (size == 2 && py::str(py::object(dtype)).cast<std::string>() == "bfloat16") out = DType::BF16;
  else if (kind == 'u' && size == 2 && u16_as_f16) out = DType::F16;
  else if (kind == 'i' && size == 4) out = DType::I32;
  else if (kind == 'u' && size == 1) out = DType::U8;
  else if (kind == 'u' && size == 4) out = DType::U32;
  else return false;
  return true;
}

// Whether a tensor of `found` holds `wanted` bit for bit: u32 words may come as int32
// (torch has no general uint32 type).
inline bool same_storage(DType found, DType wanted) {
  return found == wanted || (wanted == DType::U32 && found == DType::I32);
}

// A safetensors dtype name ("F16", "U32" ...) from Python; ValueError for the rest.
inline DType dtype_named(const std::string& name) {
  DType dtype;
  if (!parse_dtype(name, dtype)) throw py::value_error("unsupported dtype '" + name + "'");
  return dtype;
}

// Runs `work` without the GIL; the core's errors (bad settings, bad input) become ValueError.
template <typename Work>
void without_gil(Work&& work) {
  try {
    py::gil_scoped_release release;
    work();
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
}

// A read-only NumPy array viewing `view`, keeping `owner` alive through its base.
// Misaligned views (possible in foreign files) are copied instead.
inline py::array kept_array(const std::shared_ptr<const void>& owner, const TensorView& view) {
  if (reinterpret_cast<std::uintptr_t>(view.data) % dtype_size(view.dtype) != 0) {
    py::array copy(numpy_storage_dtype(view.dtype), view.shape);
    std::memcpy(copy.mutable_data(), view.data, view.nbytes());
    return copy;
  }
  auto* keep = new std::shared_ptr<const void>(owner);
  py::capsule base(keep, [](void* pointer) { delete static_cast<std::shared_ptr<const void>*>(pointer); });
  std::vector<py::ssize_t> strides;
  for (std::int64_t stride : view.strides) strides.push_back(py::ssize_t(stride * dtype_size(view.dtype)));
  py::array array(numpy_storage_dtype(view.dtype), view.shape, strides, view.data, base);
  py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return array;
}

// A borrowed tensor: a view plus whatever keeps its memory alive (host memory, or
// device memory for the CUDA bindings). A consumed
// DLPack tensor is released through its deleter when this goes away (with the GIL
// held: producers' deleters may touch Python objects).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;
  HostTensor(HostTensor&& other) noexcept { *this = std::move(other); }
  HostTensor& operator=(HostTensor&& other) noexcept {
    release();
    view = std::move(other.view);
    writable = other.writable;
    managed_ = other.managed_;
    array_ = std::move(other.array_);
    other.managed_ = nullptr;
    return *this;
  }
  ~HostTensor() { release(); }

  TensorView view;
  bool writable = true;

  void adopt(DLManagedTensor* managed) { managed_ = managed; }
  void keep(py::object array) { array_ = std::move(array); }

 private:
  void release() {
    if (managed_ != nullptr && managed_->deleter != nullptr) managed_->deleter(managed_);
    managed_ = nullptr;
  }
  DLManagedTensor* managed_ = nullptr;
  py::object array_;
};

inline std::string type_name(py::handle object) { return py::str(py::type::handle_of(object).attr("__name__")); }

namespace detail {

// Takes ownership of the DLManagedTensor in an unconsumed "dltensor" capsule.
inline DLManagedTensor* adopt_capsule(const py::object& capsule, const char* name) {
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    throw py::value_error(std::string(name) + ": __dlpack__ did not return an unconsumed 'dltensor' capsule");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  // From here on we own the tensor: rename so the capsule's destructor leaves it alone.
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  return managed;
}

inline HostTensor from_dlpack(py::handle object, bool u16_as_f16, const char* name) {
  HostTensor tensor;
  DLManagedTensor* managed = adopt_capsule(object.attr("__dlpack__")(), name);
  tensor.adopt(managed);
  try {
    tensor.view = host_tensor_view(managed->dl_tensor, name, u16_as_f16);
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
  return tensor;
}

inline HostTensor from_array(py::handle object, bool u16_as_f16, const char* name) {
  py::array array;
  try {
    array = py::array::ensure(object);
  } catch (...) {
  }
  if (!array) throw py::value_error(std::string(name) + ": expected an array or tensor, got " + type_name(object));
  if (!py::isinstance<py::array>(object))  // e.g. a list: a fresh array, never an output
    if (array.size() > 0 && std::string(name) == "out")
      throw py::value_error("out: must be an array or tensor, not " + type_name(object));
  HostTensor tensor;
  DType dtype;
  if (!dtype_of_numpy(array.dtype(), dtype, u16_as_f16))
    throw py::value_error(std::string(name) + ": unsupported dtype " + py::str(py::object(array.dtype())).cast<std::string>());
  Shape shape(array.shape(), array.shape() + array.ndim()), strides;
  for (py::ssize_t i = 0; i < array.ndim(); ++i) {
    if (array.strides(i) % array.itemsize() != 0)
      throw py::value_error(std::string(name) + ": strides are not a multiple of the item size");
    strides.push_back(array.strides(i) / array.itemsize());
  }
  tensor.writable = array.writeable();
  tensor.view = TensorView(const_cast<void*>(array.data()), dtype, std::move(shape), std::move(strides));
  tensor.keep(array);
  return tensor;
}

}  // namespace detail

// Anything with `__dlpack__` (torch CPU tensors, NumPy arrays) without a copy or,
// failing that, anything NumPy can view (read-only NumPy arrays, which DLPack cannot
// export; ml_dtypes.bfloat16 arrays). `name` names the argument in errors.
inline HostTensor host_tensor(py::handle object, const char* name, bool u16_as_f16 = false) {
  if (object.is_none()) throw py::value_error(std::string(name) + ": got None");
  if (py::hasattr(object, "__dlpack__")) {
    try {
      return detail::from_dlpack(object, u16_as_f16, name);
    } catch (py::error_already_set& error) {
      // NumPy refuses to export read-only arrays (and exotic dtypes) through DLPack;
      // its own array interface still views them without a copy.
      if (!error.matches(PyExc_BufferError) && !error.matches(PyExc_TypeError) && !error.matches(PyExc_RuntimeError))
        throw;
    }
  }
  return detail::from_array(object, u16_as_f16, name);
}

// A CompressedDelta over five borrowed Python tensors (`pieces` in DeltaPiece order;
// scales and salient may be float16 or their uint16 bits), validated by
// CompressedDelta::over_views to `checks`, whose FormatError names the tensor and field.
struct BorrowedDelta {
  std::array<HostTensor, 5> memory;  // keeps the pieces alive, in DeltaPiece order
  CompressedDelta delta;
};

inline BorrowedDelta borrowed_delta(const std::array<py::handle, 5>& pieces, std::string name, std::int64_t rows,
                                    std::int64_t cols, int bits, std::int64_t group_size, DeltaChecks checks,
                                    const std::string& cols_origin = "") {
  BorrowedDelta borrowed;
  for (const DeltaPiece piece : kDeltaPieces)
    borrowed.memory[std::size_t(piece)] = host_tensor(pieces[std::size_t(piece)], delta_piece_name(piece),
                                                      delta_piece_dtype(piece) == DType::F16);
  const auto view = [&](DeltaPiece piece) -> const TensorView& { return borrowed.memory[std::size_t(piece)].view; };
  borrowed.delta = CompressedDelta::over_views(
      std::move(name), rows, cols, bits, group_size, -1, view(DeltaPiece::qweight), view(DeltaPiece::scales),
      view(DeltaPiece::zeros), view(DeltaPiece::salient_idx), view(DeltaPiece::salient), checks, cols_origin);
  return borrowed;
}

}  // namespace meswitch::bindings
