// Rows of a compressed delta dequantized and added into float32 rows: a delta folded into a
// widened slab of the base's rows, so that one BLAS GEMM applies base and delta to an
// expert's many tokens (a prefill), where the fused kernels' cost grows with every token.
//
// The values are dequantize_row's (quantize.hpp, the rule): (code - zero) * scale, the
// salient values added into their columns, then the row added into `out`, the same float
// operations in the same order, so every path gives the same bits (tested). The AVX2 path
// takes 1-, 2- and 4-bit codes: eight codes of one word per vector, shifted apart with
// vpsrlvd, converted and scaled eight at a time; 3- and 8-bit codes, the reference path
// (MESWITCH_CPU_PATH=reference) and CPUs without AVX2 run dequantize_row itself. Tiles of
// rows run on the kernels' thread pool (MESWITCH_NUM_THREADS).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/cpu/simd.hpp"
#include "meswitch/cpu/threading.hpp"
#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/quantize.hpp"

#if MESWITCH_X86_KERNELS
#include <immintrin.h>
#endif

namespace meswitch::cpu {

namespace detail {

inline void add_row(const float* row, std::int64_t cols, float* out) {
  for (std::int64_t c = 0; c < cols; ++c) out[c] += row[c];
}

#if MESWITCH_X86_KERNELS
// Row r dequantized into `row` (cols floats), for bits 1, 2 or 4 (whole codes per word).
__attribute__((target("avx2,fma,f16c,bmi2"))) inline void avx2_dequantize_row(const CompressedDelta& q, std::int64_t r,
                                                                                float* row) {
  const std::uint32_t* words = q.qweight + r * q.words_per_row();
  const int bits = q.bits, per_word = 32 / bits;
  const int word_shift = bits == 1 ? 5 : bits == 2 ? 4 : 3;  // log2(per_word): no division per code
  const std::uint32_t mask = (1u << bits) - 1u;
  const std::int64_t groups = q.groups();
  const __m256i lane_shift = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
  const __m256i lane_mask = _mm256_set1_epi32(int(mask));
  for (std::int64_t g = 0; g < groups; ++g) {
    const float zero = float(q.zeros[std::size_t(r * groups + g)]);
    const float scale = f16_to_float(q.scales[std::size_t(r * groups + g)]);
    const __m256 zeros = _mm256_set1_ps(zero), scales = _mm256_set1_ps(scale);
    const std::int64_t end = std::min((g + 1) * q.group_size, q.cols);
    for (std::int64_t c = g * q.group_size; c < end;) {
      const int within = int(c & (per_word - 1));
      const std::uint32_t word = words[c >> word_shift];
      if (c + 8 <= end && within + 8 <= per_word) {  // eight codes of one word
        const __m256i shifted =
            _mm256_srlv_epi32(_mm256_set1_epi32(int(word)), _mm256_add_epi32(lane_shift, _mm256_set1_epi32(within * bits)));
        const __m256 codes = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, lane_mask));
        _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_sub_ps(codes, zeros), scales));
        c += 8;
      } else {  // a group or row ending inside eight codes, or a group starting inside a word
        row[c] = (float((word >> (within * bits)) & mask) - zero) * scale;
        ++c;
      }
    }
  }
  const std::size_t k = std::size_t(q.k);
  for (std::size_t i = 0; i < k; ++i) row[q.salient_idx[i]] += f16_to_float(q.salient[std::size_t(r) * k + i]);
}

__attribute__((target("avx2,fma,f16c,bmi2"))) inline void avx2_add_row(const float* row, std::int64_t cols, float* out) {
  std::int64_t c = 0;
  for (; c + 8 <= cols; c += 8)
    _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), _mm256_loadu_ps(row + c)));
  for (; c < cols; ++c) out[c] += row[c];
}
#endif

}  // namespace detail

// out[i, :] += row first + i of the dequantized delta, for i < count, rows `out_stride`
// floats apart. Throws Error for rows outside the delta. Callers validate q first.
inline void add_dequantized_rows(const CompressedDelta& q, std::int64_t first, std::int64_t count, float* out,
                                 std::int64_t out_stride) {
  if (first < 0 || count < 0 || first + count > q.rows)
    throw Error("rows " + std::to_string(first) + ".." + std::to_string(first + count) + " are outside delta '" +
                q.name + "' (" + std::to_string(q.rows) + " rows)");
  // Tiles of rows over the kernels' thread pool; each worker its own scratch row.
  constexpr std::int64_t kTileRows = 16;
  const std::int64_t tiles = (count + kTileRows - 1) / kTileRows;
  const int threads = int(std::min<std::int64_t>(resolve_num_threads(0), std::max<std::int64_t>(tiles, 1)));
  std::vector<std::vector<float>> rows(std::size_t(threads), std::vector<float>(std::size_t(q.cols)));
  std::vector<std::vector<std::uint8_t>> codes(std::size_t(threads), std::vector<std::uint8_t>(std::size_t(q.cols)));
#if MESWITCH_X86_KERNELS
  // Every path but the reference has AVX2 (resolve_cpu_path checked the CPU).
  const bool avx2 = resolve_cpu_path() != CpuPath::Reference && (q.bits == 1 || q.bits == 2 || q.bits == 4);
#else
  [[maybe_unused]] const bool avx2 = false;
#endif
  parallel_for(tiles, threads, [&](int worker, std::int64_t tile) {
    float* row = rows[std::size_t(worker)].data();
    for (std::int64_t i = tile * kTileRows; i < std::min(count, (tile + 1) * kTileRows); ++i) {
#if MESWITCH_X86_KERNELS
      if (avx2) {
        detail::avx2_dequantize_row(q, first + i, row);
        detail::avx2_add_row(row, q.cols, out + i * out_stride);
        continue;
      }
#endif
      dequantize_row(q, first + i, codes[std::size_t(worker)].data(), row);
      detail::add_row(row, q.cols, out + i * out_stride);
    }
  });
}

}  // namespace meswitch::cpu
