// The fused delta GEMM on the GPU, host side: what a launch takes and the rules it checks.
//
//   y[t, :] += x[t, :] @ dequant(Q_e)^T + x[t, salient_idx_e] @ S_e^T    e = the expert of token t
//
// for every token of a mixed batch in one launch per linear (the kernel and its layout:
// delta_gemm.cuh). Tokens come in any order; the segment table (segments.hpp), built on
// the device from per-token expert ids, says which expert each token uses.
//
// Rules, checked before anything is launched (meswitch::Error / FormatError naming the
// delta or argument): every expert of one call shares rows and cols, both multiples of 64,
// group sizes multiples of 16 or whole rows; x is F16 or BF16 with 16-byte aligned rows
// (unit column stride); y is F32, F16 or BF16 with unit column stride, accumulated in
// place in float32 and rounded once to its type. All pointers are device memory of the
// current device. Work is enqueued on `stream` and nothing waits for it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/cuda/segments.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch::cuda {

// One expert's delta in the tile layout (tile_layout.hpp), in device memory; not owned.
struct DeviceDeltaView {
  std::string name;  // for errors
  std::int64_t rows = 0, cols = 0, group_size = 0, k = 0;
  int bits = 0;
  const std::uint32_t* codes = nullptr;
  const std::uint32_t* params = nullptr;
  const std::int32_t* salient_idx = nullptr;
  const std::uint16_t* salient = nullptr;

  std::int64_t groups() const { return group_size > 0 ? (cols + group_size - 1) / group_size : 0; }
};

// A row-major matrix in device memory: `rows` rows of `cols` elements, `row_stride`
// elements apart.
struct DeviceMatrix {
  void* data = nullptr;
  DType dtype = DType::F16;
  std::int64_t rows = 0, cols = 0, row_stride = 0;
};

// Adds every token's expert delta to y; tokens whose id was < 0 are left alone, tokens
// whose id was >= experts.size() get NaN rows (see segments.hpp). `experts[e]` is expert e
// of the table; a null view (codes == nullptr with rows == 0) is an expert without this
// linear and its tokens get no delta here.
void multi_delta_matmul(const std::vector<DeviceDeltaView>& experts, const DeviceMatrix& x,
                        const SegmentTableView& segments, const DeviceMatrix& y, cudaStream_t stream);

}  // namespace meswitch::cuda
