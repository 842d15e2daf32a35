// Dense GEMM of a few tokens against a 16-bit (or float32) weight on the CPU:
//
//     y[t, r] = sum_c x[t, c] * W[r, c]       W [rows = out, cols = in]: F16, BF16 or F32,
//                                              rows any stride, columns contiguous
//                                              x [tokens, cols]: float32 (F16/BF16 widened), any strides
//                                              y [tokens, rows]: float32, written (not accumulated)
//
// This is the base model's share of a decode step, which costs more than the experts' deltas.
//
// Why one token is memory-bound: every weight is used once per token, so one token does
// one FMA lane per 2 weight bytes; at 8 lanes per FMA that is 16 bytes per FMA, more
// than DRAM delivers per cycle. The kernel's job at one token is to read W exactly once
// at full bandwidth: several rows stream side by side with a software prefetch ahead of
// each, and nothing else touches memory. From about 4 tokens on the FMAs are the limit
// (one 256-bit FMA per cycle on the 2-core EPYC we measure), so the kernel's job becomes
// keeping the FMA unit busy: each weight vector, once loaded and widened, feeds the FMAs
// of every token in its register block, and W still comes from DRAM once per call.
//
// Loop structure (dense_gemm_tile.inc), L = lanes (8 AVX2, 16 AVX-512), a step = 2L columns:
//
//   row tiles of 16 rows                         -> threads (cpu/threading.hpp), split over rows
//     column chunks: x of every token for the chunk (tokens x chunk x 4 B <= 128 KiB) stays in L2
//       groups of 4 rows: their chunk of W (<= 4 x chunk x 4 B) stays in L1/L2 for every token block
//         token blocks of <= 4 tokens on AVX2 (16 -> 4 x 4, 7 -> 4 + 3), <= 6 on AVX-512
//           register block R rows x TB tokens: per step and half, R weight vectors widened
//           once, each multiplied with TB x vectors into R*TB accumulators
//
//   R = 4 for TB <= 2 and 2 for TB >= 3 on AVX2 (R*TB + R + 2 <= 16 ymm registers),
//   4 on AVX-512 (30 of 32 zmm). W is widened in registers as it streams, the first
//   token block prefetching ahead and the others finding the group's chunk in cache;
//   F16 with several token blocks is instead widened to float32 once per group and chunk
//   into per-thread scratch, which every block reads (vcvtph2ps competes with the FMAs). Per-lane partial sums wait in per-thread scratch between chunks and are
//   summed across lanes once at the end.
//
// Widening: F16 by vcvtph2ps (F16C); F32 is loaded as is; BF16 by a 16-bit shift: a
// vector of 2L bf16 read as L 32-bit lanes holds an even column in each lane's low half
// (shifted left 16, a float) and an odd column in its high half (low half masked off, a
// float): two ALU operations per 2L weights, no shuffle. The x copy the kernel reads is
// permuted to match (even columns first, then odd, within each step) once per call.
//
// Accuracy: float32 products and sums. Each lane accumulates ceil(cols / L) products in
// order and the L lanes are then added, so |y - exact| <= (cols / L + L) * 2^-24 *
// sum_c |W[r, c] x[t, c]| (to first order); the tests check (cols / 8 + 17) * 2^-24 * that
// sum, which covers L = 8 and 16. The order is the same whatever the token count, so a
// token's outputs are the same bits alone or beside others (tested).
//
// Paths (cpu/simd.hpp, the delta kernel's rule): reference (the spec below, double
// accumulation), avx2 (also used by avx2int), avx512 (also used by avx512vnni): the
// integer paths have nothing for float weights.
// AVX512-BF16's vdpbf16ps (twice the products per instruction) is not used: it needs x
// rounded to bf16, a relative error of up to 2^-9 per x instead of float32's 2^-24.
// Any token count runs; the token blocks make larger batches correct, not fast.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "meswitch/cpu/aligned_vector.hpp"
#include "meswitch/cpu/kernel_options.hpp"
#include "meswitch/cpu/simd.hpp"
#include "meswitch/cpu/threading.hpp"
#include "meswitch/error.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch::cpu::detail {

// W as the kernels read it: bytes of row r at data + r * row_bytes.
struct DenseWeight {
  const unsigned char* data = nullptr;
  std::int64_t rows = 0, cols = 0, row_bytes = 0;
  DType dtype = DType::F32;
};

// x of one call in the order the SIMD tile reads it: chunk-major, so the slice of every
// token for one column chunk is one contiguous run (token-major rows a multiple of 4 KiB
// apart would fall into the same L1 sets and evict each other).
struct DenseTokens {
  std::int64_t tokens = 0, cols = 0, chunk_cols = 0, chunks = 0;
  AlignedVector<float> x;  // [chunks, tokens, chunk_cols], zero past cols, bf16 order when asked

  const float* chunk(std::int64_t k, std::int64_t t) const { return x.data() + (k * tokens + t) * chunk_cols; }
};

// Bytes of x per column chunk: a quarter of a 512 KiB L2. Chunks that fit L1 (16 KiB)
// were measured slower from 4 tokens on (60 % against 70 % of the FMA rate at 16 tokens
// on Zen 1): each chunk switch stores and reloads every accumulator of the block, and
// L2 streams x fast enough for the FMAs.
constexpr std::int64_t kDenseChunkBytes = 131072;
// Rows per group (see the loop structure above).
constexpr std::int64_t kDenseGroupRows = 4;

// Row r of a TensorView W.
inline const unsigned char* dense_row(const TensorView& weight, std::int64_t r) {
  return static_cast<const unsigned char*>(weight.data) + std::size_t(r * weight.strides[0]) * dtype_size(weight.dtype);
}

// `lanes` per vector; `bf16_order`: within each step of 2 * lanes columns, the even
// columns first, then the odd ones (the order the bf16 shift-and-mask widening yields).
inline void prepare_dense_tokens(const TensorView& x, int lanes, bool bf16_order, DenseTokens& out) {
  const std::int64_t tokens = x.shape[0], cols = x.shape[1], step = 2 * std::int64_t(lanes);
  const std::int64_t padded = std::max(step, (cols + step - 1) / step * step);
  out.tokens = tokens;
  out.cols = cols;
  out.chunk_cols = std::min(padded, std::max(step, kDenseChunkBytes / (4 * std::max<std::int64_t>(tokens, 1)) / step * step));
  out.chunks = (padded + out.chunk_cols - 1) / out.chunk_cols;
  out.x.assign(std::size_t(out.chunks * tokens * out.chunk_cols), 0.0f);
  std::vector<std::int64_t> source(static_cast<std::size_t>(step));  // column of position j within a step
  for (std::int64_t j = 0; j < step; ++j) source[std::size_t(j)] = !bf16_order ? j : j < lanes ? 2 * j : 2 * (j - lanes) + 1;
  std::vector<float> row(static_cast<std::size_t>(cols));
  const auto* bytes = static_cast<const unsigned char*>(x.data);
  const std::size_t item = dtype_size(x.dtype);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const unsigned char* x_row = bytes + std::size_t(t * x.strides[0]) * item;
    if (x.strides[1] == 1) {
      convert_to_f32(x_row, x.dtype, row.data(), std::size_t(cols));
    } else {
      for (std::int64_t c = 0; c < cols; ++c) row[std::size_t(c)] = load_as_float(x_row, x.dtype, std::size_t(c * x.strides[1]));
    }
    for (std::int64_t k = 0; k < out.chunks; ++k) {
      float* destination = out.x.data() + (k * tokens + t) * out.chunk_cols;
      for (std::int64_t first = k * out.chunk_cols; first < std::min(cols, (k + 1) * out.chunk_cols); first += step) {
        if (first + step <= cols) {
          for (std::int64_t j = 0; j < step; ++j) destination[j] = row[std::size_t(first + source[std::size_t(j)])];
        } else {  // the row's last, partial step: zeros past cols (the buffer starts zeroed)
          for (std::int64_t j = 0; j < step; ++j)
            if (first + source[std::size_t(j)] < cols) destination[j] = row[std::size_t(first + source[std::size_t(j)])];
        }
        destination += step;
      }
    }
  }
}

// The spec: y[t, r] = sum_c W[r, c] x[t, c], products and sum in double, rounded once.
// Slow on purpose; the SIMD paths are tested against it.
inline void dense_reference_rows(const TensorView& weight, const TensorView& x, std::int64_t row_begin,
                                 std::int64_t row_end, float* y, std::int64_t y_row_stride) {
  const auto* x_bytes = static_cast<const unsigned char*>(x.data);
  const std::size_t item = dtype_size(x.dtype);
  const std::int64_t cols = weight.shape[1];
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    const unsigned char* w_row = dense_row(weight, r);
    for (std::int64_t t = 0; t < x.shape[0]; ++t) {
      const unsigned char* x_row = x_bytes + std::size_t(t * x.strides[0]) * item;
      double sum = 0;
      for (std::int64_t c = 0; c < cols; ++c)
        sum += double(load_as_float(w_row, weight.dtype, std::size_t(c))) *
               double(load_as_float(x_row, x.dtype, std::size_t(c * x.strides[1])));
      y[t * y_row_stride + r] = float(sum);
    }
  }
}

// W and x of a call; errors name the argument and what is wrong with it.
inline void check_dense_operands(const TensorView& weight, const TensorView& x) {
  if (weight.rank() != 2) throw Error("weight must be 2-D [out, in], got shape " + shape_string(weight.shape));
  if (weight.dtype != DType::F16 && weight.dtype != DType::BF16 && weight.dtype != DType::F32)
    throw Error(std::string("weight must be F16, BF16 or F32, got ") + dtype_name(weight.dtype));
  const std::int64_t rows = weight.shape[0], cols = weight.shape[1];
  if (cols > 1 && weight.strides[1] != 1)
    throw Error("weight must have contiguous rows (column stride 1), got strides " + shape_string(weight.strides));
  if (rows > 1 && weight.strides[0] < cols)
    throw Error("weight row stride " + std::to_string(weight.strides[0]) + " is smaller than its " +
                std::to_string(cols) + " columns");
  if (x.rank() != 2) throw Error("x must be 2-D [tokens, in], got shape " + shape_string(x.shape));
  if (!is_floating(x.dtype)) throw Error(std::string("x must be F32, BF16 or F16, got ") + dtype_name(x.dtype));
  if (x.shape[1] != cols)
    throw Error("x has shape " + shape_string(x.shape) + " but weight has shape " + shape_string(weight.shape) +
                " (x's columns must equal weight's)");
  if (x.strides.size() != 2 || x.strides[0] < 0 || x.strides[1] < 0)
    throw Error("x strides " + shape_string(x.strides) + " are not supported (negative); pass a copy");
  if (x.shape[0] > 0 && rows > 0 && cols > 0 && (x.data == nullptr || weight.data == nullptr))
    throw Error("x or weight has no data");
}

}  // namespace meswitch::cpu::detail

#include "meswitch/cpu/dense_gemm_x86.hpp"

namespace meswitch::cpu {

// y[t, r] = sum_c x[t, c] * weight[r, c] (written, not accumulated).
//
// weight: [rows, cols] F16, BF16 or F32 with contiguous rows (any row stride). x: [tokens,
// cols] floating, any non-negative strides (widened to float32 once per call). y: tokens
// rows of at least `rows` floats, y_row_stride floats apart. options: threads, path and
// rows per work item (KernelOptions::activation_digits does not apply).
inline void dense_matmul(const TensorView& weight, const TensorView& x, float* y, std::int64_t y_row_stride,
                         const KernelOptions& options = {}) {
  detail::check_dense_operands(weight, x);
  const CpuPath path = resolve_cpu_path(options.path);
  const int threads = resolve_num_threads(options.num_threads);
  if (options.row_tile < 0) throw Error("row_tile must be >= 0, got " + std::to_string(options.row_tile));
  const std::int64_t row_tile = options.row_tile > 0 ? options.row_tile : 16;
  const std::int64_t rows = weight.shape[0], cols = weight.shape[1], tokens = x.shape[0];
  if (tokens == 0 || rows == 0) return;
  if (y == nullptr) throw Error("y is null");
  if (tokens > 1 && y_row_stride < rows)
    throw Error("y row stride " + std::to_string(y_row_stride) + " is smaller than the weight's " +
                std::to_string(rows) + " output rows");
  const std::int64_t tiles = (rows + row_tile - 1) / row_tile;
  if (path == CpuPath::Reference || cols == 0) {
    parallel_for(tiles, threads, [&](int, std::int64_t tile) {
      detail::dense_reference_rows(weight, x, tile * row_tile, std::min(rows, (tile + 1) * row_tile), y, y_row_stride);
    });
    return;
  }
#if MESWITCH_X86_KERNELS
  const bool avx2 = path == CpuPath::Avx2 || path == CpuPath::Avx2Int;  // avx2int: its float kernel
  const int lanes = avx2 ? 8 : 16;
  detail::DenseTokens prepared;
  detail::prepare_dense_tokens(x, lanes, weight.dtype == DType::BF16, prepared);
  const detail::DenseWeight w{detail::dense_row(weight, 0), rows, cols,
                              std::int64_t(weight.strides[0] * std::int64_t(dtype_size(weight.dtype))), weight.dtype};
  const int workers = int(std::min<std::int64_t>(threads, tiles));
  // Per worker: the tile's per-lane partial sums, then a row group's widened chunk.
  const std::int64_t partial_floats = row_tile * tokens * lanes;
  std::vector<detail::AlignedVector<float>> scratch(std::size_t(std::max(workers, 1)));
  for (auto& buffer : scratch) buffer.resize(std::size_t(partial_floats + detail::kDenseGroupRows * prepared.chunk_cols));
  parallel_for(tiles, workers, [&](int worker, std::int64_t tile) {
    const std::int64_t begin = tile * row_tile, end = std::min(rows, begin + row_tile);
    float* partial = scratch[std::size_t(worker)].data();
    float* widened = partial + partial_floats;
    if (avx2)
      detail::avx2_dense::dense_tile(w, prepared, begin, end, y, y_row_stride, partial, widened);
    else
      detail::avx512_dense::dense_tile(w, prepared, begin, end, y, y_row_stride, partial, widened);
  });
#endif
}

}  // namespace meswitch::cpu
