// Host side of the delta GEMM: checks every rule of delta_gemm.hpp with the argument's
// name in the message, then enqueues one launch per 64 experts (one for any real batch).
#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/delta_gemm.cuh"
#include "meswitch/cuda/delta_gemm.hpp"
#include "meswitch/cuda/tiled_delta.hpp"

namespace meswitch::cuda {
namespace kernels {

extern template cudaError_t launch_delta_gemm<__half, 1>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
extern template cudaError_t launch_delta_gemm<__half, 2>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
extern template cudaError_t launch_delta_gemm<__half, 4>(const KernelExperts&, const KernelProblem&, dim3, cudaStream_t);
extern template cudaError_t launch_delta_gemm<__nv_bfloat16, 1>(const KernelExperts&, const KernelProblem&, dim3,
                                                                cudaStream_t);
extern template cudaError_t launch_delta_gemm<__nv_bfloat16, 2>(const KernelExperts&, const KernelProblem&, dim3,
                                                                cudaStream_t);
extern template cudaError_t launch_delta_gemm<__nv_bfloat16, 4>(const KernelExperts&, const KernelProblem&, dim3,
                                                                cudaStream_t);

}  // namespace kernels

namespace {

std::string expert_name(const DeviceDeltaView& delta, std::size_t index) {
  return delta.name.empty() ? "experts[" + std::to_string(index) + "]" : delta.name;
}

void check_expert(const DeviceDeltaView& delta, std::size_t index, std::int64_t rows, std::int64_t cols) {
  const std::string name = expert_name(delta, index);
  check_tileable(delta.rows, delta.cols, delta.bits, delta.group_size, name);
  if (delta.rows != rows || delta.cols != cols)
    throw FormatError("", name, "has shape [" + std::to_string(delta.rows) + ", " + std::to_string(delta.cols) +
                                    "], the other experts of this call [" + std::to_string(rows) + ", " +
                                    std::to_string(cols) + "]");
  if (delta.k < 0 || delta.k > delta.cols)
    throw FormatError("", name, "k = " + std::to_string(delta.k) + " salient channels, expected 0.." + std::to_string(cols));
  if (delta.codes == nullptr || delta.params == nullptr || (delta.k > 0 && (delta.salient == nullptr || delta.salient_idx == nullptr)))
    throw FormatError("", name, "a device array of the tiled delta is null");
}

bool is_null_view(const DeviceDeltaView& delta) { return delta.codes == nullptr && delta.rows == 0; }

}  // namespace

void multi_delta_matmul(const std::vector<DeviceDeltaView>& experts, const DeviceMatrix& x,
                        const SegmentTableView& segments, const DeviceMatrix& y, cudaStream_t stream) {
  if (experts.empty()) throw Error("multi_delta_matmul: no experts");
  if (std::int64_t(experts.size()) != segments.experts)
    throw Error("multi_delta_matmul: " + std::to_string(experts.size()) + " experts but the segment table was built for " +
                std::to_string(segments.experts));
  check_segment_sizes(segments.tokens, segments.experts);
  std::int64_t rows = -1, cols = -1;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    if (is_null_view(experts[e])) continue;
    if (rows < 0) rows = experts[e].rows, cols = experts[e].cols;
    check_expert(experts[e], e, rows, cols);
  }
  if (rows < 0) return;  // no expert has this linear
  if (x.dtype != DType::F16 && x.dtype != DType::BF16)
    throw Error(std::string("x: the CUDA kernels take F16 or BF16 activations, got ") + dtype_name(x.dtype));
  if (x.cols != cols)
    throw Error("x has " + std::to_string(x.cols) + " columns but the experts' deltas have " + std::to_string(cols));
  if (x.rows != segments.tokens || y.rows != segments.tokens)
    throw Error("x has " + std::to_string(x.rows) + " rows and y " + std::to_string(y.rows) +
                " but the segment table was built for " + std::to_string(segments.tokens) + " tokens");
  if (x.row_stride < cols || x.row_stride % 8 != 0 || reinterpret_cast<std::uintptr_t>(x.data) % 16 != 0)
    throw Error("x: the CUDA kernels read 16-byte aligned rows (a row stride that is a multiple of 8 elements, at "
                "least cols); got row stride " + std::to_string(x.row_stride) + " at address offset " +
                std::to_string(reinterpret_cast<std::uintptr_t>(x.data) % 16) + " (pass a contiguous tensor)");
  if (y.dtype != DType::F32 && y.dtype != DType::F16 && y.dtype != DType::BF16)
    throw Error(std::string("out: expected F32, F16 or BF16, got ") + dtype_name(y.dtype));
  if (y.cols != rows) throw Error("out has " + std::to_string(y.cols) + " columns but the deltas have " + std::to_string(rows) + " rows");
  if (y.row_stride < rows) throw Error("out: row stride " + std::to_string(y.row_stride) + " is smaller than " + std::to_string(rows));
  if (segments.tokens == 0) return;
  if (x.data == nullptr || y.data == nullptr || segments.order == nullptr || segments.items == nullptr)
    throw Error("multi_delta_matmul: x, out or the segment table is null");

  kernels::KernelProblem problem{};
  problem.x = x.data;
  problem.x_row_stride = x.row_stride;
  problem.y = y.data;
  problem.y_row_stride = y.row_stride;
  problem.rows = int(rows);
  problem.cols = int(cols);
  problem.y_type = y.dtype == DType::F32 ? kernels::OutputType::F32
                   : y.dtype == DType::F16 ? kernels::OutputType::F16 : kernels::OutputType::BF16;
  problem.order = segments.order;
  problem.items = segments.items;
  const dim3 grid(unsigned(rows / tile::kRows), unsigned(segments.capacity()), 1);
  const int tiles_per_item = segments.tokens_per_block() / 8;

  for (std::size_t first = 0; first < experts.size(); first += kernels::kMaxExpertsPerLaunch) {
    kernels::KernelExperts launch{};
    launch.first = int(first);
    launch.count = int(std::min<std::size_t>(kernels::kMaxExpertsPerLaunch, experts.size() - first));
    launch.write_poison = first == 0;
    for (int i = 0; i < launch.count; ++i) {
      const DeviceDeltaView& delta = experts[first + std::size_t(i)];
      launch.deltas[i] = {delta.codes, delta.params, delta.salient_idx, delta.salient, delta.bits,
                          int(delta.group_size), int(delta.groups()), int(delta.k)};
    }
    cudaError_t status = cudaSuccess;
    const bool bf16 = x.dtype == DType::BF16;
    switch (tiles_per_item) {
      case 1: status = bf16 ? kernels::launch_delta_gemm<__nv_bfloat16, 1>(launch, problem, grid, stream)
                            : kernels::launch_delta_gemm<__half, 1>(launch, problem, grid, stream); break;
      case 2: status = bf16 ? kernels::launch_delta_gemm<__nv_bfloat16, 2>(launch, problem, grid, stream)
                            : kernels::launch_delta_gemm<__half, 2>(launch, problem, grid, stream); break;
      default: status = bf16 ? kernels::launch_delta_gemm<__nv_bfloat16, 4>(launch, problem, grid, stream)
                             : kernels::launch_delta_gemm<__half, 4>(launch, problem, grid, stream); break;
    }
    MESWITCH_CUDA_CHECK(status, "multi_delta_matmul: launching the delta GEMM for " + std::to_string(launch.count) +
                                    " experts from " + expert_name(experts[first], first) + " ([" + std::to_string(rows) +
                                    ", " + std::to_string(cols) + "], " + std::to_string(segments.tokens) + " tokens, " +
                                    dtype_name(x.dtype) + " x)");
  }
}

}  // namespace meswitch::cuda
