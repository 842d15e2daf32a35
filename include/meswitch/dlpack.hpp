// The DLPack ABI (v0.8 layout), so tensors cross between meswitch, NumPy and
// PyTorch without copies and without building against either framework.
//
// Only the C structs of the open DLPack specification are declared here; they are
// a fixed ABI shared by every framework. `to_dlpack_dtype` / `from_dlpack_dtype`
// map them to meswitch's DType.
#pragma once

#include <cstdint>

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

inline DType from_dlpack_dtype(DLDataType dtype) {
  if (dtype.lanes == 1) {
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

}  // namespace meswitch
