// Device-side dtype conversion, used when checkpoints are uploaded in 16 bit and a
// consumer wants float32 on the device. Launchers return cudaError_t; callers check.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "meswitch/tensor.hpp"

namespace meswitch::cuda {

// Widens `count` contiguous F16/BF16/F32 values at `source` (device memory) to
// float32 at `destination` (device memory), asynchronously on `stream`.
cudaError_t widen_to_f32(const void* source, DType dtype, float* destination, std::size_t count,
                         cudaStream_t stream);

// Narrows float32 to F16/BF16 with round-to-nearest-even, bit-identical to the CPU path.
cudaError_t narrow_from_f32(const float* source, DType dtype, void* destination, std::size_t count,
                            cudaStream_t stream);

}  // namespace meswitch::cuda
