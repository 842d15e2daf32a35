// The fused delta GEMM kernel: y[t] += x[t] @ dequant(Q_e)^T + x[t, idx_e] @ S_e^T for the
// tokens of every expert e of a mixed batch, in one launch, on tensor cores.
//
// Work decomposition
//
//   grid.x   one 16-row tile of the outputs          (rows / 16 blocks)
//   grid.y   one work item of the segment table      (an expert and <= 8 * NT of its tokens)
//   block    8 warps; warp w takes the column tiles w, w + 8, w + 16, ... of the row tile
//
//                      columns (input) ->
//            | kt 0 | kt 1 | ... | kt 7 | kt 8 | kt 9 | ...        one tile = 16 rows x 64 cols
//   rows     |  w0  |  w1  | ... |  w7  |  w0  |  w1  | ...        = four k-steps of 16
//   16       '------'------'-----'------'------'------'
//
//   Each warp multiplies its tiles by the block's tokens with mma.m16n8k16: the delta is
//   the A operand (16 rows x 16 k), the tokens the B operand (16 k x 8 tokens, NT of them),
//   so a batch of one to eight tokens costs one mma per step, not a padded 64-token GEMM.
//   The 8 warps' float32 partial sums meet in shared memory at the end, the salient
//   columns are added on CUDA cores in float32, and each output is read, added to and
//   written once: no atomics, and the same result for a token whatever else is in the batch.
//
// Why the tile layout (tile_layout.hpp)
//
//   - Coalesced codes. A lane's codes of a tile are `bits` words, stored [tile][word][lane]:
//     each of the warp's loads is 128 contiguous bytes, and consecutive tiles of a warp's
//     row tile are contiguous, so the codes stream from DRAM at full line width with no
//     shared-memory staging. The canonical layout (one bitstream per row) would need 16
//     row streams per warp and a shuffle of every code into fragment order.
//   - Fragment order. The words hold exactly the codes of the lane's mma A registers,
//     pair by pair, so dequantizing a register is a shift, a mask with the two codes'
//     positions (one AND puts both codes of a pair into the low mantissa bits of two
//     16-bit floats) and one packed subtract: no unpacking loop, no shuffles, no
//     shared memory.
//   - Adjacent k. The mma does not care which column stands behind each k as long as A and
//     B agree, so the layout gives lane t the four adjacent columns 16 s + 4 t .. + 3 of
//     each step: its activations are one 8-byte load per token and step, straight from
//     global memory (L2), and a quantization group (a multiple of 16 columns) never splits
//     a step, so one scale multiplies each step's float32 sums.
//   - Exact dequantization. code - zero is an exact small integer in f16 and bf16 (the
//     1024 / 128 trick in tile_layout.hpp), so the tensor core multiplies exact weights by x
//     and accumulates in float32; the f16 scale multiplies each group's sums in float32.
//     Nothing is rounded that the CPU reference does not round, apart from the order of
//     the float32 sums.
//   - Scales and zero points per row tile and group, [tile][group][16 rows]: the 16 values
//     a warp needs for a group are one 64-byte line, read when the group changes.
//
// Latency. A warp loads its next tile's codes and activations before it multiplies the
// current one (registers, double-buffered); with 8 warps a block and several blocks an SM
// that keeps enough bytes in flight for a memory-bound decode step.
//
// The kernel is a template on the activation type and NT (8, 16 or 32 tokens per work
// item); the bit width is a switch per block (uniform), so one launch serves experts of
// different widths.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "meswitch/cuda/segments.hpp"
#include "meswitch/cuda/tile_layout.hpp"

namespace meswitch::cuda::kernels {

inline constexpr int kWarps = 8;
inline constexpr int kThreads = kWarps * 32;
// Experts whose views travel in one launch's parameters (a launch per 64 experts beyond).
inline constexpr int kMaxExpertsPerLaunch = 64;
// Salient activations staged in shared memory at a time, per token.
inline constexpr int kSalientChunk = 64;
// Row stride of the shared reduction buffer: 20 floats puts the four lanes of a thread
// group (tokens 2t, 2t + 1) into different banks.
inline constexpr int kReductionRowStride = 20;

enum class OutputType : int { F32 = 0, F16 = 1, BF16 = 2 };

// One expert's tiled delta as the kernel reads it (device pointers).
struct KernelDelta {
  const std::uint32_t* codes;
  const std::uint32_t* params;
  const std::int32_t* salient_idx;
  const std::uint16_t* salient;
  int bits, group_size, groups, k;
};

struct KernelExperts {
  KernelDelta deltas[kMaxExpertsPerLaunch];
  int first;        // expert id of deltas[0]
  int count;        // deltas in this launch
  int write_poison; // this launch also writes the NaN rows of out-of-range ids
};

struct KernelProblem {
  const void* x;
  long long x_row_stride;  // elements
  void* y;
  long long y_row_stride;  // elements
  int rows, cols;
  OutputType y_type;
  const std::int32_t* order;
  const WorkItem* items;
};

// The packed 16-bit float arithmetic and the tensor-core instruction for one activation type.
template <typename Activation>
struct Arithmetic;

template <>
struct Arithmetic<__half> {
  static constexpr std::uint32_t kMagic = tile::kF16Magic;
  static constexpr std::uint32_t kOnes = 0x3c003c00u;  // 1.0, 1.0
  // a - b on both halves (exact for the small integers it sees), as a * 1 + (-b).
  __device__ static std::uint32_t subtract(std::uint32_t a, std::uint32_t b) {
    std::uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(kOnes), "r"(b ^ 0x80008000u));
    return d;
  }
  __device__ static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static float to_float(std::uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
};

template <>
struct Arithmetic<__nv_bfloat16> {
  static constexpr std::uint32_t kMagic = tile::kBf16Magic;
  static constexpr std::uint32_t kOnes = 0x3f803f80u;
  __device__ static std::uint32_t subtract(std::uint32_t a, std::uint32_t b) {
    std::uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(kOnes), "r"(b ^ 0x80008000u));
    return d;
  }
  __device__ static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static float to_float(std::uint16_t bits) { return __uint_as_float(std::uint32_t(bits) << 16); }
};

// What a warp holds of one column tile: the lane's code words and its activations for
// each step and n-tile (B registers 0 and 1 in .x and .y).
template <int Bits, int NT>
struct TileOperands {
  std::uint32_t words[Bits];
  uint2 x[tile::kSteps][NT];
};

template <int Bits, int NT>
__device__ __forceinline__ void load_tile(const std::uint32_t* lane_codes, int col_tile, const std::uint16_t* const (&x_rows)[NT],
                                          TileOperands<Bits, NT>& tile_operands) {
#pragma unroll
  for (int w = 0; w < Bits; ++w)
    tile_operands.words[w] = __ldg(lane_codes + (std::int64_t(col_tile) * Bits + w) * tile::kLanes);
#pragma unroll
  for (int s = 0; s < tile::kSteps; ++s)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      tile_operands.x[s][nt] =
          x_rows[nt] != nullptr
              ? __ldg(reinterpret_cast<const uint2*>(x_rows[nt] + col_tile * tile::kCols + s * tile::kStepCols))
              : make_uint2(0u, 0u);
}

// The group's scales and zero points of the lane's two rows (g and g + 8).
struct RowParams {
  float scale[2];
  std::uint32_t zero[2];  // magic + zero, both halves
};

// One warp's pass over its column tiles of the row tile: acc[nt][i] is the lane's
// accumulator element i of n-tile nt (rows g, g + 8; tokens 2t, 2t + 1), float32.
template <typename Activation, int NT, int Bits>
__device__ __forceinline__ void accumulate_tiles(const KernelDelta& delta, const KernelProblem& problem,
                                                 const int* token_of, float (&acc)[NT][4]) {
  using Math = Arithmetic<Activation>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col_tiles = problem.cols / tile::kCols;
  const std::int64_t row_tile = blockIdx.x;
  const std::uint32_t* lane_codes = delta.codes + tile::code_word_index(row_tile, 0, col_tiles, Bits, 0, lane);
  const std::uint32_t* tile_params = delta.params + tile::param_index(row_tile, 0, delta.groups, 0);
  const std::uint16_t* x = static_cast<const std::uint16_t*>(problem.x);
  const std::uint16_t* x_rows[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int token = token_of[nt * 8 + tile::activation_token(lane)];
    x_rows[nt] = token >= 0 ? x + token * problem.x_row_stride + tile::activation_col(lane, 0) : nullptr;
  }

  float part[NT][4];  // the current group's sums, scaled into acc when the group changes
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = part[nt][i] = 0.0f;
  RowParams params{{0.0f, 0.0f}, {0u, 0u}};
  int current_group = -1;
  const int row_low = tile::fragment_row(lane, 0), row_high = tile::fragment_row(lane, 1);

  TileOperands<Bits, NT> current, next;
  int col_tile = warp;
  if (col_tile < col_tiles) load_tile<Bits, NT>(lane_codes, col_tile, x_rows, current);
  for (; col_tile < col_tiles; col_tile += kWarps) {
    if (col_tile + kWarps < col_tiles) load_tile<Bits, NT>(lane_codes, col_tile + kWarps, x_rows, next);
    // The tile's first group by one division; a step (16 columns) crosses at most one
    // group boundary, so later steps only compare.
    int group = (col_tile * tile::kCols) / delta.group_size;
    int group_end = (group + 1) * delta.group_size;
#pragma unroll
    for (int s = 0; s < tile::kSteps; ++s) {
      const int step_col = col_tile * tile::kCols + s * tile::kStepCols;
      if (step_col >= group_end) {
        ++group;
        group_end += delta.group_size;
      }
      if (group != current_group) {  // uniform across the warp
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc[nt][i] += params.scale[i >> 1] * part[nt][i];
            part[nt][i] = 0.0f;
          }
        const std::uint32_t low = __ldg(tile_params + group * tile::kRows + row_low);
        const std::uint32_t high = __ldg(tile_params + group * tile::kRows + row_high);
        params.scale[0] = __half2float(__ushort_as_half(tile::param_scale_f16(low)));
        params.scale[1] = __half2float(__ushort_as_half(tile::param_scale_f16(high)));
        params.zero[0] = tile::zero_as_floats(tile::param_zero(low), Math::kMagic);
        params.zero[1] = tile::zero_as_floats(tile::param_zero(high), Math::kMagic);
        current_group = group;
      }
      std::uint32_t a[4];
#pragma unroll
      for (int f = 0; f < 4; ++f)
        a[f] = Math::subtract(tile::pair_as_floats<Bits>(current.words, tile::pair_of(s, f), Math::kMagic),
                              params.zero[f & 1]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Math::mma(part[nt], a, current.x[s][nt].x, current.x[s][nt].y);
    }
    current = next;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] += params.scale[i >> 1] * part[nt][i];
}

__device__ __forceinline__ void store_output(const KernelProblem& problem, int token, int row, float value) {
  const long long at = token * problem.y_row_stride + row;
  switch (problem.y_type) {
    case OutputType::F32: {
      float* y = static_cast<float*>(problem.y) + at;
      *y += value;
      break;
    }
    case OutputType::F16: {
      __half* y = static_cast<__half*>(problem.y) + at;
      *y = __float2half_rn(__half2float(*y) + value);
      break;
    }
    case OutputType::BF16: {
      __nv_bfloat16* y = static_cast<__nv_bfloat16*>(problem.y) + at;
      *y = __float2bfloat16_rn(__bfloat162float(*y) + value);
      break;
    }
  }
}

// Tokens of an out-of-range expert id: NaN in this row tile of their output rows.
__device__ __forceinline__ void write_poison(const KernelProblem& problem, const WorkItem& item) {
  const int row0 = blockIdx.x * tile::kRows;
  for (int e = threadIdx.x; e < item.count * tile::kRows; e += kThreads) {
    const int token = problem.order[item.begin + e / tile::kRows];
    const long long at = token * problem.y_row_stride + row0 + e % tile::kRows;
    switch (problem.y_type) {
      case OutputType::F32: static_cast<float*>(problem.y)[at] = __int_as_float(0x7fc00000); break;
      case OutputType::F16: static_cast<std::uint16_t*>(problem.y)[at] = 0x7e00u; break;
      case OutputType::BF16: static_cast<std::uint16_t*>(problem.y)[at] = 0x7fc0u; break;
    }
  }
}

template <typename Activation, int NT>
__global__ void __launch_bounds__(kThreads)
    delta_gemm_kernel(const __grid_constant__ KernelExperts experts, const __grid_constant__ KernelProblem problem) {
  using Math = Arithmetic<Activation>;
  constexpr int kTokens = 8 * NT;
  constexpr int kElements = (kTokens * tile::kRows + kThreads - 1) / kThreads;  // outputs per thread
  const WorkItem item = problem.items[blockIdx.y];
  if (item.expert == kNoItem) return;
  if (item.expert == kPoisonItem) {
    if (experts.write_poison) write_poison(problem, item);
    return;
  }
  const int slot = item.expert - experts.first;
  if (slot < 0 || slot >= experts.count) return;
  const KernelDelta& delta = experts.deltas[slot];
  if (delta.codes == nullptr) return;  // an expert without this linear

  __shared__ int token_of[kTokens];
  __shared__ float partial[kWarps][kTokens][kReductionRowStride];
  __shared__ float salient_x[kTokens][kSalientChunk];
  if (threadIdx.x < kTokens) token_of[threadIdx.x] = threadIdx.x < item.count ? problem.order[item.begin + threadIdx.x] : -1;
  __syncthreads();

  float acc[NT][4];
  switch (delta.bits) {
    case 1: accumulate_tiles<Activation, NT, 1>(delta, problem, token_of, acc); break;
    case 2: accumulate_tiles<Activation, NT, 2>(delta, problem, token_of, acc); break;
    case 3: accumulate_tiles<Activation, NT, 3>(delta, problem, token_of, acc); break;
    default: accumulate_tiles<Activation, NT, 4>(delta, problem, token_of, acc); break;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      partial[warp][nt * 8 + tile::accumulator_token(lane, i)][tile::accumulator_row(lane, i)] = acc[nt][i];
  __syncthreads();

  // Output e of the block: row e % 16, token e / 16; each thread owns kElements of them.
  float total[kElements];
#pragma unroll
  for (int i = 0; i < kElements; ++i) {
    const int e = threadIdx.x + i * kThreads;
    total[i] = 0.0f;
    if (e < kTokens * tile::kRows)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total[i] += partial[w][e / tile::kRows][e % tile::kRows];
  }

  // Salient columns: x[t, idx_j] * S[r, j] in float32, k / kSalientChunk chunks of x
  // gathered into shared memory (k may be anything up to cols).
  const std::uint16_t* x = static_cast<const std::uint16_t*>(problem.x);
  const std::uint16_t* tile_salient = delta.salient + tile::salient_index(blockIdx.x, 0, delta.k, 0);
  for (int chunk = 0; chunk < delta.k; chunk += kSalientChunk) {
    const int width = min(kSalientChunk, delta.k - chunk);
    __syncthreads();  // the previous chunk is consumed
    for (int e = threadIdx.x; e < kTokens * kSalientChunk; e += kThreads) {
      const int n = e / kSalientChunk, j = e % kSalientChunk, token = token_of[n];
      salient_x[n][j] = token >= 0 && j < width
                            ? Math::to_float(x[token * problem.x_row_stride + delta.salient_idx[chunk + j]])
                            : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kElements; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e >= kTokens * tile::kRows) continue;
      const int n = e / tile::kRows, r = e % tile::kRows;
      float sum = 0.0f;
      for (int j = 0; j < width; ++j)
        sum += __half2float(__ushort_as_half(__ldg(tile_salient + (chunk + j) * tile::kRows + r))) * salient_x[n][j];
      total[i] += sum;
    }
  }

#pragma unroll
  for (int i = 0; i < kElements; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e >= kTokens * tile::kRows) continue;
    const int token = token_of[e / tile::kRows];
    if (token >= 0) store_output(problem, token, blockIdx.x * tile::kRows + e % tile::kRows, total[i]);
  }
}

}  // namespace meswitch::cuda::kernels

namespace meswitch::cuda::kernels {

// Enqueues one launch; instantiated per activation type in cuda/delta_gemm_<type>.cu.
template <typename Activation, int NT>
cudaError_t launch_delta_gemm(const KernelExperts& experts, const KernelProblem& problem, dim3 grid,
                              cudaStream_t stream) {
  delta_gemm_kernel<Activation, NT><<<grid, kThreads, 0, stream>>>(experts, problem);
  return cudaGetLastError();
}

}  // namespace meswitch::cuda::kernels
