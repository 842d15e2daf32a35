// Dense dequantization of a tiled delta (dequantize.hpp): one block per row tile, its
// warps over the column tiles as in the GEMM, then the salient values of the tile's rows.
#include <string>

#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/delta_gemm.cuh"
#include "meswitch/cuda/dequantize.hpp"
#include "meswitch/cuda/tiled_delta.hpp"

namespace meswitch::cuda {
namespace {

template <typename Activation, int Bits>
__global__ void __launch_bounds__(kernels::kThreads)
    dequantize_kernel(kernels::KernelDelta delta, int cols, float* out, long long out_row_stride) {
  using Math = kernels::Arithmetic<Activation>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col_tiles = cols / tile::kCols;
  const std::int64_t row_tile = blockIdx.x;
  for (int col_tile = warp; col_tile < col_tiles; col_tile += kernels::kWarps) {
    std::uint32_t words[Bits];
    for (int w = 0; w < Bits; ++w) words[w] = delta.codes[tile::code_word_index(row_tile, col_tile, col_tiles, Bits, w, lane)];
    for (int pair = 0; pair < tile::kPairs; ++pair) {
      const int step = tile::step_of_pair(pair), f = tile::fragment_of_pair(pair);
      const int row = tile::fragment_row(lane, f);
      const std::int64_t group = tile::group_of_step(col_tile, step, delta.group_size);
      const std::uint32_t param = delta.params[tile::param_index(row_tile, group, delta.groups, row)];
      const std::uint32_t integers = Math::subtract(tile::pair_as_floats<Bits>(words, pair, Math::kMagic),
                                                    tile::zero_as_floats(tile::param_zero(param), Math::kMagic));
      const float scale = __half2float(__ushort_as_half(tile::param_scale_f16(param)));
      for (int e = 0; e < 2; ++e) {
        const float value = Math::to_float(std::uint16_t(integers >> (16 * e))) * scale;
        out[(row_tile * tile::kRows + row) * out_row_stride + col_tile * tile::kCols + tile::fragment_col(lane, step, f, e)] = value;
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < delta.k * tile::kRows; e += kernels::kThreads) {
    const int j = e / tile::kRows, r = e % tile::kRows;
    out[(row_tile * tile::kRows + r) * out_row_stride + delta.salient_idx[j]] +=
        __half2float(__ushort_as_half(delta.salient[tile::salient_index(row_tile, j, delta.k, r)]));
  }
}

template <typename Activation>
void launch(const kernels::KernelDelta& delta, const DeviceDeltaView& view, float* out, std::int64_t stride,
            cudaStream_t stream) {
  const dim3 grid(unsigned(view.rows / tile::kRows));
  switch (view.bits) {
    case 1: dequantize_kernel<Activation, 1><<<grid, kernels::kThreads, 0, stream>>>(delta, int(view.cols), out, stride); break;
    case 2: dequantize_kernel<Activation, 2><<<grid, kernels::kThreads, 0, stream>>>(delta, int(view.cols), out, stride); break;
    case 3: dequantize_kernel<Activation, 3><<<grid, kernels::kThreads, 0, stream>>>(delta, int(view.cols), out, stride); break;
    default: dequantize_kernel<Activation, 4><<<grid, kernels::kThreads, 0, stream>>>(delta, int(view.cols), out, stride); break;
  }
}

}  // namespace

void dequantize_delta(const DeviceDeltaView& delta, DType activation, float* out, std::int64_t out_row_stride,
                      cudaStream_t stream) {
  const std::string name = delta.name.empty() ? "delta" : delta.name;
  check_tileable(delta.rows, delta.cols, delta.bits, delta.group_size, name);
  if (activation != DType::F16 && activation != DType::BF16)
    throw Error(std::string("dequantize_delta: activation type must be F16 or BF16, got ") + dtype_name(activation));
  if (out == nullptr || delta.codes == nullptr || delta.params == nullptr) throw Error("dequantize_delta: null pointer");
  if (out_row_stride < delta.cols)
    throw Error("dequantize_delta: out row stride " + std::to_string(out_row_stride) + " is smaller than " +
                std::to_string(delta.cols));
  const kernels::KernelDelta kernel_delta{delta.codes, delta.params, delta.salient_idx, delta.salient, delta.bits,
                                          int(delta.group_size), int(delta.groups()), int(delta.k)};
  if (activation == DType::F16) launch<__half>(kernel_delta, delta, out, out_row_stride, stream);
  else launch<__nv_bfloat16>(kernel_delta, delta, out, out_row_stride, stream);
  MESWITCH_CUDA_CHECK(cudaGetLastError(), "dequantize_delta: launching for '" + name + "'");
}

}  // namespace meswitch::cuda
