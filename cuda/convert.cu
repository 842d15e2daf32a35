// Grid-stride element-wise conversions. They reuse the host bit-manipulation code
// (compiled for the device too) so CPU and GPU round identically; a checkpoint
// converted on either side has the same bits.
#include <cuda_fp16.h>

#include <cstdint>

#include "meswitch/cuda/convert.hpp"

namespace meswitch::cuda {
namespace {

__device__ __forceinline__ float device_f16_to_float(std::uint16_t half) {
  return __half2float(__ushort_as_half(half));
}

__device__ __forceinline__ std::uint16_t device_float_to_f16(float value) {
  return __half_as_ushort(__float2half_rn(value));
}

__device__ __forceinline__ std::uint16_t device_float_to_bf16(float value) {
  const std::uint32_t bits = __float_as_uint(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((bits >> 16) | 0x0040u);  // quiet NaN
  return std::uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

template <typename Function>
__global__ void for_each_index(std::size_t count, Function function) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < count;
       i += std::size_t(gridDim.x) * blockDim.x)
    function(i);
}

template <typename Function>
cudaError_t launch(std::size_t count, cudaStream_t stream, Function function) {
  if (count == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const std::size_t wanted = (count + kThreads - 1) / kThreads;
  const unsigned blocks = unsigned(wanted < 65535 * 8 ? wanted : 65535 * 8);
  for_each_index<<<blocks, kThreads, 0, stream>>>(count, function);
  return cudaGetLastError();
}

}  // namespace

cudaError_t widen_to_f32(const void* source, DType dtype, float* destination, std::size_t count,
                         cudaStream_t stream) {
  switch (dtype) {
    case DType::F32:
      return cudaMemcpyAsync(destination, source, count * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    case DType::F16: {
      const auto* half = static_cast<const std::uint16_t*>(source);
      return launch(count, stream, [=] __device__(std::size_t i) { destination[i] = device_f16_to_float(half[i]); });
    }
    case DType::BF16: {
      const auto* bf16 = static_cast<const std::uint16_t*>(source);
      return launch(count, stream,
                    [=] __device__(std::size_t i) { destination[i] = __uint_as_float(std::uint32_t(bf16[i]) << 16); });
    }
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t narrow_from_f32(const float* source, DType dtype, void* destination, std::size_t count,
                            cudaStream_t stream) {
  auto* out = static_cast<std::uint16_t*>(destination);
  switch (dtype) {
    case DType::F16:
      return launch(count, stream, [=] __device__(std::size_t i) { out[i] = device_float_to_f16(source[i]); });
    case DType::BF16:
      return launch(count, stream, [=] __device__(std::size_t i) { out[i] = device_float_to_bf16(source[i]); });
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace meswitch::cuda
