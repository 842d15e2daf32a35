// Fused dequant-GEMM for compressed deltas on the CPU:
//
//     y[t, :] += x[t, :] @ dequant(Q)^T + x[t, salient_idx] @ S^T
//
// straight from the packed codes; the dense delta is never materialised.
//
// Canonical layout (docs/format.md), one weight W of shape [rows = out, cols = in]:
//
//   qweight  u32 [rows, words]      words = ceil(cols * bits / 32); each row one
//                                    little-endian bitstream, code c at stream bits
//                                    [c*bits, (c+1)*bits), stream bit i = bit i%32 of
//                                    word i/32, every row starting on a fresh word
//   scales   f16 [rows, groups]     groups = ceil(cols / group_size) (last may be short)
//   zeros    u8  [rows, groups]
//   salient_idx i32 [k]             salient S f16 [rows, k]
//
//   row r:  | w0 | w1 | w2 | ...                        (2 bits: 16 codes per word)
//           c0 c1 ... c15 | c16 ... c31 | ...
//   D[r,c] = (code[r,c] - zeros[r, c/g]) * scales[r, c/g]        (float32)
//
// The group trick. Within a group the scale and zero are constant, so
//   sum_c D[r,c] x_c = sum_g s_g * (sum_{c in g} code_c x_c) - sum_g s_g z_g X_g
// with X_g = sum_{c in g} x_c computed once per token. The inner loop is then a
// plain dot product of raw integer codes with x, and the zero point costs one
// multiply per group instead of one subtract per weight.
//
// SIMD layout (delta_gemm_x86.hpp). A "unit" is the smallest run of whole words that
// holds a whole number of codes: one word for 1, 2 and 4 bits (32, 16, 8 codes) and
// three words for 3 bits (32 codes, two of them straddling words). A vector lane owns
// one unit, so a block of L lanes (16 for AVX-512, 8 for AVX2) covers L * codes-per-unit
// consecutive columns:
//
//   lanes ->    lane 0        lane 1        ...  lane L-1
//   words       w0            w1                 w(L-1)          (2 bits, L = 16: 256 columns)
//   position p  code 16*0+p   code 16*1+p        code 16*(L-1)+p
//
// Position p of every lane is extracted with one AND against the mask (3 << 2p) —
// no shift — and converted to float as code * 2^(2p). That factor 2^(-2p) is folded
// into a copy of x permuted to the same [block][position][lane] order once per call,
// so each 16 codes cost an AND, a convert and one FMA per token. Powers of two are
// exact, so this changes no rounding (unless |x| < 2^-96, where x * 2^-30 is subnormal). A
// lane never crosses a group boundary when the group size is a multiple of the
// codes-per-unit, so the per-lane sums are scaled by a per-lane scale vector once per
// block. The last block of a row may be partial (cols not a multiple of the block, as the
// 688-wide rows of a small model): its words are loaded with a lane mask, so nothing past
// the row is read, and x is zero-padded to whole blocks, so the lanes past the row's last
// column (and any padding bits of its last word) add nothing. Only group sizes that are not
// a multiple of the unit, whose lanes would straddle groups, take the scalar path.
//
// Paths (cpu/simd.hpp): the float kernels above (AVX-512, AVX2) are exact to float32
// rounding; the integer paths take the same lanes but multiply the code bytes with x held
// as int8 digits (delta_gemm_digits.hpp), because the float kernels are bound by FMA
// throughput at a fraction of memory bandwidth: AVX-512 VNNI (delta_gemm_vnni.hpp, the
// default where the CPU has VNNI + GFNI) 64 codes per vpdpbusd, AVX2
// (delta_gemm_avx2int.hpp, the default on AVX2 CPUs without AVX-512) 32 per vpmaddubsw.
//
// Work split: output rows in tiles (16 rows) handed to threads (cpu/threading.hpp).
// Inside a tile the columns are walked in chunks small enough that the chunk of x for
// a block of up to 8 tokens (4 on AVX2 and on VNNI with two digits) stays in L1 while
// every row of the tile uses it; each row's codes are unpacked once per token block, so
// a segment's tokens share one pass over the expert's packed delta (the tile's codes
// stay in L1/L2 between token blocks). Per-lane partial sums wait in per-thread scratch
// between chunks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/cpu/aligned_vector.hpp"
#include "meswitch/cpu/kernel_options.hpp"
#include "meswitch/cpu/simd.hpp"
#include "meswitch/cpu/threading.hpp"
#include "meswitch/dispatch.hpp"
#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch::cpu {

namespace detail {

// Code c of one packed row, straddling words when bits = 3.
inline std::uint32_t code_at(const std::uint32_t* row, int bits, std::int64_t c) {
  const std::int64_t bit = c * bits;
  const std::int64_t word = bit >> 5;
  const int shift = int(bit & 31);
  std::uint32_t value = row[word] >> shift;
  if (shift + bits > 32) value |= row[word + 1] << (32 - shift);
  return value & ((1u << bits) - 1u);
}

}  // namespace detail

namespace detail {

// The spec, transcribed: every weight dequantised in float32 exactly as
// docs/format.md says, multiplied and accumulated in double. Slow on purpose; the
// fast paths are tested against it.
inline void reference_rows(const CompressedDelta& delta, const TensorView& x, std::int64_t token_begin,
                           std::int64_t token_end, std::int64_t row_begin, std::int64_t row_end, float* y,
                           std::int64_t y_row_stride) {
  const std::int64_t words = delta.words_per_row(), groups = delta.groups();
  const auto* x_bytes = static_cast<const unsigned char*>(x.data);
  const std::size_t item = dtype_size(x.dtype);
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    const std::uint32_t* row = delta.qweight + r * words;
    for (std::int64_t t = token_begin; t < token_end; ++t) {
      const unsigned char* x_row = x_bytes + std::size_t(t * x.strides[0]) * item;
      auto x_at = [&](std::int64_t c) { return load_as_float(x_row, x.dtype, std::size_t(c * x.strides[1])); };
      double sum = 0;
      for (std::int64_t c = 0; c < delta.cols; ++c) {
        const std::int64_t g = c / delta.group_size;
        const float scale = f16_to_float(delta.scales[r * groups + g]);
        const float zero = float(delta.zeros[r * groups + g]);
        const float dequant = (float(code_at(row, delta.bits, c)) - zero) * scale;
        sum += double(dequant) * double(x_at(c));
      }
      for (std::int64_t j = 0; j < delta.k; ++j)
        sum += double(f16_to_float(delta.salient[r * delta.k + j])) * double(x_at(delta.salient_idx[j]));
      y[t * y_row_stride + r] += float(sum);
    }
  }
}

// Codes-per-unit geometry shared by the SIMD paths (see the layout at the top).
template <int Bits>
struct Unit {
  static constexpr int kWords = Bits == 3 ? 3 : 1;
  static constexpr int kCodes = Bits == 3 ? 32 : 32 / Bits;
  static constexpr int word(int p) { return (p * Bits) / 32; }
  static constexpr int shift(int p) { return (p * Bits) % 32; }
  static constexpr bool straddles(int p) { return shift(p) + Bits > 32; }
  static constexpr bool top(int p) { return shift(p) + Bits == 32; }
  // Extracted by masking in place: the value is code * 2^shift.
  static constexpr bool masked(int p) { return !straddles(p) && !top(p); }
  static float x_factor(int p) { return masked(p) ? std::ldexp(1.0f, -shift(p)) : 1.0f; }
};

inline int unit_codes(int bits) { return bits == 3 ? 32 : 32 / bits; }

// x of one segment's tokens, in every form the SIMD kernels read.
struct PreparedTokens {
  std::int64_t tokens = 0, cols = 0, groups = 0, k = 0;
  std::int64_t lanes = 0, block_cols = 0;
  std::int64_t blocks = 0;        // ceil(cols / block_cols), the last maybe partial; 0: all scalar
  std::int64_t x_stride = 0;      // blocks * block_cols (cols when blocks is 0)
  std::vector<float> x;           // [tokens, x_stride] float32, zero past cols
  std::vector<float> group_sums;  // [tokens, groups] X_g
  std::vector<float> salient_x;   // [tokens, k] x[t, salient_idx]
  AlignedVector<float> permuted;  // [blocks, tokens, codes-per-unit, lanes], scaled by x_factor
  int digit_count = 2;                 // integer paths: int8 digits per x value, 1 or 2 (delta_gemm_digits.hpp)
  AlignedVector<std::int8_t> digits;   // integer paths: [blocks, tokens, digit_count, 8 / bits, 4 * lanes]
  std::vector<float> digit_scales;     // integer paths: [blocks, tokens] value of one unit of the last digit
  std::vector<std::int32_t> first_group;  // [blocks] group of lane 0
  std::vector<std::int32_t> lane_group;   // [blocks, lanes] group of each lane minus first_group
};

// `permute` false leaves `permuted` empty (the integer paths read digits instead).
inline void prepare_tokens(const CompressedDelta& delta, const TensorView& x, std::int64_t token_begin,
                           std::int64_t token_end, int lanes, PreparedTokens& out, bool permute = true) {
  const std::int64_t tokens = token_end - token_begin, cols = delta.cols, groups = delta.groups();
  out.tokens = tokens;
  out.cols = cols;
  out.groups = groups;
  out.k = delta.k;
  out.lanes = lanes;
  const int codes = unit_codes(delta.bits);
  out.block_cols = std::int64_t(lanes) * codes;
  // Lanes may not straddle groups; otherwise everything goes through the scalar tail.
  const bool lanes_fit = delta.group_size % codes == 0 || groups == 1;
  out.blocks = lanes_fit ? (cols + out.block_cols - 1) / out.block_cols : 0;
  out.x_stride = out.blocks > 0 ? out.blocks * out.block_cols : cols;

  out.x.assign(std::size_t(tokens * out.x_stride), 0.0f);
  const auto* x_bytes = static_cast<const unsigned char*>(x.data);
  const std::size_t item = dtype_size(x.dtype);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const unsigned char* source = x_bytes + std::size_t((token_begin + t) * x.strides[0]) * item;
    float* destination = out.x.data() + t * out.x_stride;
    if (x.strides[1] == 1) {
      convert_to_f32(source, x.dtype, destination, std::size_t(cols));
    } else {
      for (std::int64_t c = 0; c < cols; ++c) destination[c] = load_as_float(source, x.dtype, std::size_t(c * x.strides[1]));
    }
  }
  out.group_sums.assign(std::size_t(tokens * groups), 0.0f);
  out.salient_x.resize(std::size_t(tokens * delta.k));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* row = out.x.data() + t * out.x_stride;
    for (std::int64_t g = 0; g < groups; ++g) {
      double sum = 0;  // double: X_g is subtracted from a similar-sized term later
      for (std::int64_t c = g * delta.group_size; c < std::min(cols, (g + 1) * delta.group_size); ++c) sum += row[c];
      out.group_sums[std::size_t(t * groups + g)] = float(sum);
    }
    for (std::int64_t j = 0; j < delta.k; ++j) out.salient_x[std::size_t(t * delta.k + j)] = row[delta.salient_idx[j]];
  }

  const std::int64_t blocks = out.blocks;
  out.permuted.resize(permute ? std::size_t(tokens * blocks * out.block_cols) : 0);
  std::vector<float> factor(static_cast<std::size_t>(codes));
  MESWITCH_DISPATCH_BITS(delta.bits, BITS, {
    for (int p = 0; p < codes; ++p) factor[std::size_t(p)] = Unit<BITS>::x_factor(p);
  });
  // Block-major, then token: the slice a token block reads for one block is
  // contiguous. (Token-major rows would put the tokens' slices a multiple of 4 KiB
  // apart, into the same L1 sets, and evict each other.)
  for (std::int64_t b = 0; b < (permute ? blocks : 0); ++b)
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float* row = out.x.data() + t * out.x_stride + b * out.block_cols;
      float* destination = out.permuted.data() + (b * tokens + t) * out.block_cols;
      for (int p = 0; p < codes; ++p)
        for (int lane = 0; lane < lanes; ++lane)
          *destination++ = row[std::int64_t(lane) * codes + p] * factor[std::size_t(p)];
    }
  out.first_group.resize(std::size_t(blocks));
  out.lane_group.resize(std::size_t(blocks * lanes));
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t first = (b * out.block_cols) / delta.group_size;
    out.first_group[std::size_t(b)] = std::int32_t(first);
    for (int lane = 0; lane < lanes; ++lane)  // lanes past the last column: the last group (x is 0 there)
      out.lane_group[std::size_t(b * lanes + lane)] = std::int32_t(
          std::min(groups - 1, (b * out.block_cols + std::int64_t(lane) * codes) / delta.group_size) - first);
  }
}

// Per-worker buffers for one row tile: the tile's scales, scale*zero and salient values
// as float (converted once per tile in one pass, since the tile's rows are contiguous
// in every piece, and reused by every token), and the per-lane partial sums of up to
// kMaxTokenBlock tokens while the columns are walked in chunks.
struct TileScratch {
  static constexpr std::int64_t kMaxTokenBlock = 8, kMaxLanes = 16;
  std::int64_t group_stride = 0, salient_stride = 0;
  AlignedVector<float> scales, scaled_zeros, salient, totals;

  // Room for tiles of up to tile_rows rows, groups groups and k salient channels.
  void reserve(std::int64_t tile_rows, std::int64_t groups, std::int64_t k) {
    // +16: the SIMD paths read a whole vector of scales from the last block's first group.
    scales.assign(std::size_t(tile_rows * groups + 16), 0.0f);
    scaled_zeros.assign(scales.size(), 0.0f);
    salient.assign(std::size_t(tile_rows * k + 16), 0.0f);
    totals.assign(std::size_t(tile_rows * kMaxTokenBlock * kMaxLanes), 0.0f);
  }
  // Rows packed back to back for the delta at hand (experts of one call may differ).
  void layout(std::int64_t groups, std::int64_t k) {
    group_stride = groups;
    salient_stride = k;
  }
  float* row_scales(std::int64_t i) { return scales.data() + i * group_stride; }
  float* row_scaled_zeros(std::int64_t i) { return scaled_zeros.data() + i * group_stride; }
  float* row_salient(std::int64_t i) { return salient.data() + i * salient_stride; }
  float* row_totals(std::int64_t i) { return totals.data() + i * kMaxTokenBlock * kMaxLanes; }
};

// Blocks per column chunk: few enough that a token block's slice of the prepared x
// (tokens x blocks x bytes per block and token) stays within half of a 32 KiB L1, so
// it is read from L1 for every row of the tile instead of streaming from L2 once per row.
inline std::int64_t chunk_blocks(std::int64_t tokens, std::int64_t x_bytes_per_block) {
  return std::max<std::int64_t>(1, 16384 / (tokens * x_bytes_per_block));
}

// Columns from column_begin on, scalar: sum_c s_g * code_c * x_c (all of them when the
// group size is not a multiple of the unit).
inline float tail_dot(const CompressedDelta& delta, const std::uint32_t* row, const float* scales, const float* x,
                      std::int64_t column_begin) {
  float sum = 0;
  for (std::int64_t c = column_begin; c < delta.cols; ++c)
    sum += scales[c / delta.group_size] * float(code_at(row, delta.bits, c)) * x[c];
  return sum;
}

}  // namespace detail
}  // namespace meswitch::cpu

#include "meswitch/cpu/delta_gemm_x86.hpp"

namespace meswitch::cpu {
namespace detail {

inline void check_x(const TensorView& x, std::int64_t cols) {
  if (x.rank() != 2) throw Error("x must be 2-D [tokens, cols], got shape " + shape_string(x.shape));
  if (!is_floating(x.dtype)) throw Error(std::string("x must be F32, BF16 or F16, got ") + dtype_name(x.dtype));
  if (x.shape[1] != cols)
    throw Error("x has shape " + shape_string(x.shape) + " but the delta has " + std::to_string(cols) + " input columns");
  if (x.shape[0] > 0 && cols > 0 && x.data == nullptr) throw Error("x has no data");
  if (x.strides.size() != 2 || x.strides[0] < 0 || x.strides[1] < 0)
    throw Error("x strides " + shape_string(x.strides) + " are not supported (negative); pass a copy");
}

inline void run_segments(const CompressedDelta* experts, std::size_t count, const TensorView& x,
                         const std::int64_t* segment_starts, float* y, std::int64_t y_row_stride,
                         const KernelOptions& options) {
  const CpuPath path = resolve_cpu_path(options.path);
  const int threads = resolve_num_threads(options.num_threads);
  const int digits = resolve_activation_digits(options.activation_digits);
  if (options.row_tile < 0) throw Error("row_tile must be >= 0, got " + std::to_string(options.row_tile));
  const std::int64_t row_tile = options.row_tile > 0 ? options.row_tile : 16;
  if (x.rank() != 2) throw Error("x must be 2-D [tokens, cols], got shape " + shape_string(x.shape));
  const std::int64_t tokens = x.shape[0];
  for (std::size_t e = 0; e <= count; ++e) {
    const std::int64_t start = segment_starts[e];
    if (start < 0 || start > tokens || (e > 0 && start < segment_starts[e - 1]))
      throw Error("segment_starts[" + std::to_string(e) + "] = " + std::to_string(start) +
                  " breaks 0 <= starts[0] <= ... <= starts[E] <= tokens = " + std::to_string(tokens));
  }

  struct Item { std::size_t expert; std::int64_t row_begin, row_end; };
  std::vector<Item> items;
  std::vector<PreparedTokens> prepared(count);
  std::int64_t max_groups = 0, max_k = 0, max_rows = 0;
  for (std::size_t e = 0; e < count; ++e) {
    const CompressedDelta& delta = experts[e];
    // O(k) per expert and call (the contents were scanned when the delta was built):
    // every index the kernels compute from the layout stays inside the arrays.
    delta.validate(DeltaChecks::Layout);
    check_x(x, delta.cols);
    if (segment_starts[e + 1] == segment_starts[e] || delta.rows == 0) continue;  // inactive expert
    if (y == nullptr) throw Error("y is null");
    if (y_row_stride < delta.rows)
      throw Error("y row stride " + std::to_string(y_row_stride) + " is smaller than the delta's " +
                  std::to_string(delta.rows) + " output rows");
    const int lanes = path == CpuPath::Avx2 || path == CpuPath::Avx2Int ? 8 : 16;
    if ((path == CpuPath::Avx512Vnni || path == CpuPath::Avx2Int) && delta.bits != 3) {
#if MESWITCH_X86_KERNELS
      prepare_tokens(delta, x, segment_starts[e], segment_starts[e + 1], lanes, prepared[e], false);
      quantize_digits(delta.bits, digits, prepared[e]);
#endif
    } else if (path != CpuPath::Reference)
      prepare_tokens(delta, x, segment_starts[e], segment_starts[e + 1], lanes, prepared[e]);
    for (std::int64_t r = 0; r < delta.rows; r += row_tile) items.push_back({e, r, std::min(delta.rows, r + row_tile)});
    max_groups = std::max(max_groups, delta.groups());
    max_k = std::max(max_k, delta.k);
    max_rows = std::max(max_rows, delta.rows);
  }
  if (items.empty()) return;
  const int workers = int(std::min<std::int64_t>(threads, std::int64_t(items.size())));
  std::vector<TileScratch> scratch(std::size_t(std::max(workers, 1)));
  for (TileScratch& buffers : scratch) buffers.reserve(row_tile, max_groups, max_k);

  parallel_for(std::int64_t(items.size()), workers, [&](int worker, std::int64_t index) {
    const Item& item = items[std::size_t(index)];
    const CompressedDelta& delta = experts[item.expert];
    const std::int64_t begin = segment_starts[item.expert], end = segment_starts[item.expert + 1];
    float* y_segment = y + begin * y_row_stride;
    switch (path) {
#if MESWITCH_X86_KERNELS
      case CpuPath::Avx512Vnni:
        if (delta.bits != 3) {
          MESWITCH_DISPATCH_BITS(delta.bits, BITS, {
            if constexpr (BITS != 3)
              avx512_rows<BITS, true>(delta, prepared[item.expert], item.row_begin, item.row_end, y_segment,
                                      y_row_stride, scratch[std::size_t(worker)]);
          });
          break;
        }
        [[fallthrough]];  // 3-bit codes straddle bytes: the float AVX-512 kernel
      case CpuPath::Avx512:
        MESWITCH_DISPATCH_BITS(delta.bits, BITS, {
          avx512_rows<BITS>(delta, prepared[item.expert], item.row_begin, item.row_end, y_segment, y_row_stride,
                            scratch[std::size_t(worker)]);
        });
        break;
      case CpuPath::Avx2Int:
        if (delta.bits != 3) {
          MESWITCH_DISPATCH_BITS(delta.bits, BITS, {
            if constexpr (BITS != 3)
              avx2_rows<BITS, true>(delta, prepared[item.expert], item.row_begin, item.row_end, y_segment, y_row_stride,
                                    scratch[std::size_t(worker)]);
          });
          break;
        }
        [[fallthrough]];  // 3-bit codes straddle bytes: the float AVX2 kernel
      case CpuPath::Avx2:
        MESWITCH_DISPATCH_BITS(delta.bits, BITS, {
          avx2_rows<BITS>(delta, prepared[item.expert], item.row_begin, item.row_end, y_segment, y_row_stride,
                          scratch[std::size_t(worker)]);
        });
        break;
#endif
      default:
        reference_rows(delta, x, begin, end, item.row_begin, item.row_end, y, y_row_stride);
    }
  });
}

}  // namespace detail

// y[t, r] += sum_c x[t, c] * dequant[r, c] + sum_j x[t, idx_j] * salient[r, j]
//
// x: [T, cols] F32/BF16/F16 with any strides (rows are converted to float32 once per
// call). y: T rows of at least `rows` floats, y_row_stride floats apart; accumulated.
inline void delta_matmul(const CompressedDelta& delta, const TensorView& x, float* y, std::int64_t y_row_stride,
                         const KernelOptions& options = {}) {
  const std::int64_t starts[2] = {0, x.shape[0]};
  detail::run_segments(&delta, 1, x, starts, y, y_row_stride, options);
}

// Tokens pre-sorted by expert: rows [segment_starts[e], segment_starts[e+1]) of x
// use experts[e]; y is accumulated as in delta_matmul. Every active expert's packed
// delta is read once per row tile for all the tokens of its segment; empty segments
// cost nothing. All experts share cols (x's width); rows may differ (y_row_stride
// must cover the largest).
inline void multi_delta_matmul(const std::vector<CompressedDelta>& experts, const TensorView& x,
                               const std::int64_t* segment_starts, float* y, std::int64_t y_row_stride,
                               const KernelOptions& options = {}) {
  if (segment_starts == nullptr) throw Error("segment_starts is null");
  if (experts.empty()) return;
  detail::run_segments(experts.data(), experts.size(), x, segment_starts, y, y_row_stride, options);
}

}  // namespace meswitch::cpu
