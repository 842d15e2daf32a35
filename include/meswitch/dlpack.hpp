// The DLPack ABI (v0.8 layout), so tensors cross between meswitch, NumPy and
// PyTorch without copies and without building against either framework.
//
// Only the C structs of the open DLPack specification are declared here; they are
// a fixed ABI shared by every framework. `to_dlpack_dtype` / `from_dlpack_dtype`
// map them to meswitch's DType; `host_tensor_view` and `device_tensor_view` turn a DLTensor
// into a TensorView.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "meswitch/error.hpp"
#include "meswitch/tensor.hpp"

extern "C" {

typedef enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 } DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  std::int32_t device_id;
} DLDevice;

typedef enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 } DLDataTypeCode;

typedef struct {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  std::int32_t ndim;
  DLDataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; NULL means compact row-major
  std::uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

}  // extern "C"

namespace meswitch {

inline DLDataType to_dlpack_dtype(DType dtype) {
  switch (dtype) {
    case DType::F32: return {kDLFloat, 32, 1};
    case DType::F16: return {kDLFloat, 16, 1};
    case DType::BF16: return {kDLBfloat, 16, 1};
    case DType::I32: return {kDLInt, 32, 1};
    case DType::U8: return {kDLUInt, 8, 1};
    case DType::U32: return {kDLUInt, 32, 1};
  }
  throw Error("to_dlpack_dtype: invalid dtype");
}

// `u16_as_f16`: a uint16 tensor holds f16 bit patterns (for arguments that are always
// f16, so callers may pass raw bits from frameworks without a float16 type).
inline DType from_dlpack_dtype(DLDataType dtype, bool u16_as_f16 = false) {
  if (dtype.lanes == 1) {
    if (u16_as_f16 && dtype.code == kDLUInt && dtype.bits == 16) return DType::F16;
    if (dtype.code == kDLFloat && dtype.bits == 32) return DType::F32;
    if (dtype.code == kDLFloat && dtype.bits == 16) return DType::F16;
    if (dtype.code == kDLBfloat && dtype.bits == 16) return DType::BF16;
    if (dtype.code == kDLInt && dtype.bits == 32) return DType::I32;
    if (dtype.code == kDLUInt && dtype.bits == 8) return DType::U8;
    if (dtype.code == kDLUInt && dtype.bits == 32) return DType::U32;
  }
  throw Error("unsupported DLPack dtype (code " + std::to_string(dtype.code) + ", bits " +
              std::to_string(dtype.bits) + ", lanes " + std::to_string(dtype.lanes) + ")");
}

// A view of a DLPack tensor in host memory (CPU or pinned CUDA host memory), with
// NULL strides read as compact row-major and the byte offset applied. `what` names
// the argument in errors.
inline TensorView host_tensor_view(const DLTensor& tensor, const std::string& what, bool u16_as_f16 = false) {
  if (tensor.device.device_type != kDLCPU && tensor.device.device_type != kDLCUDAHost)
    throw Error(what + ": tensor is on device type " + std::to_string(int(tensor.device.device_type)) +
                "; the CPU kernels need host memory");
  if (tensor.ndim < 0) throw Error(what + ": negative rank " + std::to_string(tensor.ndim));
  DType dtype;
  try {
    dtype = from_dlpack_dtype(tensor.dtype, u16_as_f16);
  } catch (const Error& error) {
    throw Error(what + ": " + error.what());
  }
  Shape shape(tensor.shape, tensor.shape + tensor.ndim);
  Shape strides = tensor.strides != nullptr ? Shape(tensor.strides, tensor.strides + tensor.ndim) : contiguous_strides(shape);
  void* data = static_cast<char*>(tensor.data) + tensor.byte_offset;
  return TensorView(data, dtype, std::move(shape), std::move(strides));
}

// A view of a DLPack tensor in CUDA device memory (the CUDA bindings), with its device
// index in `device`. The view's pointer is a device address: never dereference it on the host.
inline TensorView device_tensor_view(const DLTensor& tensor, const std::string& what, int& device,
                                     bool u16_as_f16 = false) {
  if (tensor.device.device_type != kDLCUDA)
    throw Error(what + ": tensor is on device type " + std::to_string(int(tensor.device.device_type)) +
                "; the CUDA kernels need CUDA device memory (type " + std::to_string(int(kDLCUDA)) + ")");
  DLTensor host_like = tensor;
  host_like.device.device_type = kDLCPU;  // the layout rules are the same; only the memory differs
  TensorView view = host_tensor_view(host_like, what, u16_as_f16);
  device = tensor.device.device_id;
  return view;
}

namespace detail {

struct ManagedHostTensor {
  std::shared_ptr<const void> owner;
  Shape shape, strides;
  DLManagedTensor managed{};
};

}  // namespace detail

// A DLManagedTensor exporting `view` (host memory) that keeps `owner` alive until the
// consumer calls its deleter.
inline DLManagedTensor* managed_host_tensor(const TensorView& view, std::shared_ptr<const void> owner) {
  auto* context = new detail::ManagedHostTensor{std::move(owner), view.shape, view.strides, {}};
  DLTensor& tensor = context->managed.dl_tensor;
  tensor.data = view.data;
  tensor.device = {kDLCPU, 0};
  tensor.ndim = std::int32_t(view.rank());
  tensor.dtype = to_dlpack_dtype(view.dtype);
  tensor.shape = context->shape.data();
  tensor.strides = view.is_contiguous() ? nullptr : context->strides.data();  // NULL: compact row-major
  tensor.byte_offset = 0;
  context->managed.manager_ctx = context;
  context->managed.deleter = [](DLManagedTensor* self) {
    delete static_cast<detail::ManagedHostTensor*>(self->manager_ctx);
  };
  return &context->managed;
}

}  // namespace meswitch
