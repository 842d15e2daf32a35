// Non-owning views of tensors, and the dtypes meswitch reads and writes.
//
// A TensorView is what every part of the library passes around: a pointer, a
// dtype, a shape and strides in *elements* (as DLPack and NumPy-divided-by-itemsize
// do). It owns nothing, so it is as cheap to pass as a pointer; whoever created the
// memory (an mmap of a safetensors file, a NumPy array, a torch tensor) keeps it alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/half.hpp"

namespace meswitch {

enum class DType : std::uint8_t { F32, F16, BF16, I32, U8, U32 };

inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::U8: return 1;
  }
  throw Error("dtype_size: invalid dtype value");
}

// Names as the safetensors format spells them.
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
    case DType::U32: return "U32";
  }
  throw Error("dtype_name: invalid dtype value");
}

// Returns false for names meswitch does not handle (F64, I64, F8 ...), so callers
// can produce an error that names the file and tensor.
inline bool parse_dtype(const std::string& name, DType& out) {
  static const struct { const char* name; DType dtype; } table[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I32", DType::I32}, {"U8", DType::U8},   {"U32", DType::U32}};
  for (const auto& entry : table) {
    if (name == entry.name) {
      out = entry.dtype;
      return true;
    }
  }
  return false;
}

inline bool is_floating(DType dtype) {
  return dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16;
}

using Shape = std::vector<std::int64_t>;

inline std::int64_t element_count(const Shape& shape) {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) count *= dim;
  return count;
}

inline Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  std::int64_t stride = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return strides;
}

inline std::string shape_string(const Shape& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Shape shape;
  Shape strides;  // in elements

  TensorView() = default;
  TensorView(void* data_, DType dtype_, Shape shape_)
      : data(data_), dtype(dtype_), shape(std::move(shape_)), strides(contiguous_strides(shape)) {}
  TensorView(void* data_, DType dtype_, Shape shape_, Shape strides_)
      : data(data_), dtype(dtype_), shape(std::move(shape_)), strides(std::move(strides_)) {
    if (strides.size() != shape.size()) throw Error("TensorView: strides and shape differ in rank");
  }

  std::size_t rank() const { return shape.size(); }
  std::int64_t numel() const { return element_count(shape); }
  std::size_t nbytes() const { return std::size_t(numel()) * dtype_size(dtype); }
  bool is_contiguous() const { return numel() <= 1 || strides == contiguous_strides(shape); }

  template <typename T>
  T* data_as() const { return static_cast<T*>(data); }
};

// Reads element `index` (flat, contiguous) of a floating tensor as float.
inline float load_as_float(const void* data, DType dtype, std::size_t index) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[index];
    case DType::F16: return f16_to_float(static_cast<const std::uint16_t*>(data)[index]);
    case DType::BF16: return bf16_to_float(static_cast<const std::uint16_t*>(data)[index]);
    default: throw Error(std::string("load_as_float: dtype ") + dtype_name(dtype) + " is not floating");
  }
}

// Converts `count` contiguous floating elements to float32 (one switch per call, so
// the loops vectorise: kernels convert their activations with this on every call).
inline void convert_to_f32(const void* source, DType dtype, float* destination, std::size_t count) {
  switch (dtype) {
    case DType::F32:
      if (count > 0) std::memcpy(destination, source, count * sizeof(float));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) destination[i] = bf16_to_float(static_cast<const std::uint16_t*>(source)[i]);
      return;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) destination[i] = f16_to_float(static_cast<const std::uint16_t*>(source)[i]);
      return;
    default:
      throw Error(std::string("convert_to_f32: dtype ") + dtype_name(dtype) + " is not floating");
  }
}

// Converts `count` float32 values to a floating dtype, rounding to nearest even.
inline void convert_from_f32(const float* source, DType dtype, void* destination, std::size_t count) {
  switch (dtype) {
    case DType::F32:
      for (std::size_t i = 0; i < count; ++i) static_cast<float*>(destination)[i] = source[i];
      return;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i)
        static_cast<std::uint16_t*>(destination)[i] = float_to_f16(source[i]);
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i)
        static_cast<std::uint16_t*>(destination)[i] = float_to_bf16(source[i]);
      return;
    default:
      throw Error(std::string("convert_from_f32: dtype ") + dtype_name(dtype) + " is not floating");
  }
}

}  // namespace meswitch
