// A tiled delta dequantized on the device into a dense float32 matrix, with the very
// per-tile arithmetic the delta GEMM uses (the 16-bit float subtract of code - zero in
// the activations' type, then the f16 scale in float32), and the salient values added
// into their columns. The GPU tests compare it bit for bit with the CPU reference
// meswitch::dequantize_delta; a caller may also use it to materialise a delta.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "meswitch/cuda/delta_gemm.hpp"

namespace meswitch::cuda {

// out: float32 [delta.rows, delta.cols] in device memory, rows `out_row_stride` floats
// apart. `activation` (F16 or BF16) picks the 16-bit type the subtract runs in.
void dequantize_delta(const DeviceDeltaView& delta, DType activation, float* out, std::int64_t out_row_stride,
                      cudaStream_t stream);

}  // namespace meswitch::cuda
