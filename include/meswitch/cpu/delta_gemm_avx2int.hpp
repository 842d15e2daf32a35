// AVX2 integer path of cpu/delta_gemm.hpp (CpuPath::Avx2Int): the packed code bytes
// multiplied with x held as int8 digits (delta_gemm_digits.hpp, the VNNI path's rule and
// layout with 32-byte blocks), for 1-, 2- and 4-bit codes; 3-bit deltas, whose codes
// straddle bytes, run the float AVX2 kernel. Included from delta_gemm_x86.hpp (whose
// helpers it uses); needs only AVX2.
//
// Why. On AVX2 the float kernel spends an AND, a convert and an FMA per 8 codes per token;
// vpmaddubsw multiplies 32 unsigned code bytes by 32 signed digit bytes and adds pairs
// into int16: 32 codes per instruction.
//
// Per block of 8 words (the AVX2 float lanes, block_cols columns) and row: position p of
// every code byte is `(words >> p * Bits) & mask` (a 16-bit shift: the bits it pulls in
// from the next byte are masked off), and for each token and digit one vpmaddubsw
// multiplies it with the digits of position p. The int16 results of all positions of the
// block are summed in int16, which is exact: a pair is at most 2 * (2^Bits - 1) * 128, and
// the 8 / Bits positions add at most 2 * 127 * 8 / Bits * (2^Bits - 1) <= 7620 (4 bits) <
// 32767. Once per block, token and digit, vpmaddwd widens the int16 pairs to int32 (against
// 128 for the hi digit, 1 for lo: 128 * hi + lo in one int32 add), and int32 lane l then
// holds the dot product of lane l's 32 / Bits columns, the float lanes' columns, so the
// per-lane scale (and the group each lane belongs to) is applied exactly as there: convert
// and one FMA per block, row and token. 8-bit codes (not in the format) would saturate
// vpmaddubsw's pairs; the static_assert below keeps that out.
#pragma once

#if MESWITCH_X86_KERNELS

#include <cstdint>

namespace meswitch::cpu::detail {

// Block b of rows row[0 .. R) for TB tokens, added to their per-lane float totals. Masked:
// the row's last, partial block (words past the row are not read).
template <int Bits, int TB, int R, int Digits, bool Masked>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE void avx2int_block(const std::uint32_t* const (&row)[R], const float* const (&scales)[R],
                                                        std::int64_t words, const PreparedTokens& prep, std::int64_t t0,
                                                        std::int64_t b, bool uniform, __m256 (&total)[R][TB]) {
  constexpr int kPerByte = 8 / Bits;
  constexpr std::int64_t kBlockBytes = Digits * kPerByte * 32;
  const __m256i mask = _mm256_set1_epi8(char((1 << Bits) - 1));
  __m256i packed[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    // The same block of the next row group (as on the VNNI path).
    _mm_prefetch(reinterpret_cast<const char*>(row[i] + R * words + b * 8), _MM_HINT_T0);
    packed[i] = Masked ? avx2_load_words(row[i] + b * 8, words - b * 8)
                       : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[i] + b * 8));
  }
  // Every position of the R rows extracted once, then token by token: each token's int16
  // sums are finished and folded into its float totals before the next token starts, so
  // only one token's sums are live (several tokens' would spill the 16 registers).
  __m256i codes[R][kPerByte];
#pragma GCC unroll 8
  for (int p = 0; p < kPerByte; ++p)
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) codes[i][p] = _mm256_and_si256(p == 0 ? packed[i] : _mm256_srli_epi16(packed[i], p * Bits), mask);
  __m256 lane_scale[R];
  {
    // Groups that are whole blocks (group size a multiple of block_cols, as 128 for 2 bits)
    // give every lane the same scale: a broadcast instead of a permute.
    const __m256i lane_group =
        uniform ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(prep.lane_group.data() + b * 8));
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const float* scale = scales[i] + prep.first_group[std::size_t(b)];
      lane_scale[i] = uniform ? _mm256_broadcast_ss(scale) : _mm256_permutevar8x32_ps(_mm256_loadu_ps(scale), lane_group);
    }
  }
  const std::int8_t* x = prep.digits.data() + (b * prep.tokens + t0) * kBlockBytes;
  const float* digit_scale = prep.digit_scales.data() + b * prep.tokens + t0;
  const __m256i hi_weight = _mm256_set1_epi16(Digits == 2 ? 1 << kDigitShift : 1);
#pragma GCC unroll 4
  for (int t = 0; t < TB; ++t) {
    __m256i hi[R], lo[R];  // int16 sums of codes * hi digit and codes * lo digit (2 digits only)
#pragma GCC unroll 8
    for (int p = 0; p < kPerByte; ++p) {
      const __m256i x_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + t * kBlockBytes + p * 32));
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const __m256i product = _mm256_maddubs_epi16(codes[i][p], x_hi);
        hi[i] = p == 0 ? product : _mm256_add_epi16(hi[i], product);
      }
      if constexpr (Digits == 2) {
        const __m256i x_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + t * kBlockBytes + (kPerByte + p) * 32));
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          const __m256i product = _mm256_maddubs_epi16(codes[i][p], x_lo);
          lo[i] = p == 0 ? product : _mm256_add_epi16(lo[i], product);
        }
      }
    }
    const __m256 token_scale = _mm256_set1_ps(digit_scale[t]);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      __m256i sum = _mm256_madd_epi16(hi[i], hi_weight);
      if constexpr (Digits == 2) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(lo[i], _mm256_set1_epi16(1)));
      total[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(lane_scale[i], token_scale), total[i][t]);
    }
  }
}

// Rows [r0, r0 + R) of the tile for tokens [t0, t0 + TB) over blocks [block_begin,
// block_end), x as Digits int8 digits. The R rows share every load of x; the per-lane
// float partial sums live in scratch between column chunks, as in avx2_chunk.
template <int Bits, int TB, int R, int Digits>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE void avx2int_row_group(const CompressedDelta& delta, const PreparedTokens& prep,
                                                            std::int64_t row_begin, std::int64_t r0, std::int64_t t0,
                                                            std::int64_t block_begin, std::int64_t block_end,
                                                            TileScratch& scratch) {
  static_assert(2 * 128 * (8 / Bits) * ((1 << Bits) - 1) <= 32767, "int16 sums of a block would saturate");
  const std::int64_t words = delta.words_per_row();
  const std::uint32_t* row[R];
  const float* scales[R];
  __m256 total[R][TB];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    row[i] = delta.qweight + (r0 + i) * words;
    scales[i] = scratch.row_scales(r0 + i - row_begin);
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t)
      total[i][t] = block_begin == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(scratch.row_totals(r0 + i - row_begin) + t * 8);
  }
  // Whole blocks with plain loads; the row's last block may be partial.
  const bool uniform = delta.group_size % prep.block_cols == 0 || prep.groups == 1;
  const std::int64_t whole_end = std::min(block_end, words / 8);
  std::int64_t b = block_begin;
  for (; b < whole_end; ++b) avx2int_block<Bits, TB, R, Digits, false>(row, scales, words, prep, t0, b, uniform, total);
  for (; b < block_end; ++b) avx2int_block<Bits, TB, R, Digits, true>(row, scales, words, prep, t0, b, uniform, total);
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) _mm256_storeu_ps(scratch.row_totals(r0 + i - row_begin) + t * 8, total[i][t]);
}

// Every row of the tile: rows in groups of R sharing each x load, as many as the 16
// vector registers hold (R x 8 / Bits extracted code vectors, R x TB float totals and
// R x Digits int16 sums).
template <int Bits, int TB, int Digits>
MESWITCH_TARGET_AVX2 void avx2int_rows(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                       std::int64_t row_end, std::int64_t t0, std::int64_t block_begin,
                                       std::int64_t block_end, TileScratch& scratch) {
  constexpr int R = Bits >= 2 && TB <= 2 ? 2 : 1;
  std::int64_t r = row_begin;
  for (; r + R <= row_end; r += R)
    avx2int_row_group<Bits, TB, R, Digits>(delta, prep, row_begin, r, t0, block_begin, block_end, scratch);
  for (; r < row_end; ++r)
    avx2int_row_group<Bits, TB, 1, Digits>(delta, prep, row_begin, r, t0, block_begin, block_end, scratch);
}

// n (1 .. 4, avx2_rows' token block) tokens from t0, blocks [b0, b1) of the tile's rows.
template <int Bits>
MESWITCH_TARGET_AVX2 void avx2int_chunk(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                        std::int64_t row_end, std::int64_t t0, std::int64_t n, std::int64_t b0,
                                        std::int64_t b1, TileScratch& scratch) {
#define MESWITCH_AVX2INT_ROWS(TB, DIGITS) \
  avx2int_rows<Bits, TB, DIGITS>(delta, prep, row_begin, row_end, t0, b0, b1, scratch)
  if (prep.digit_count == 1) {
    switch (n) {
      case 1: MESWITCH_AVX2INT_ROWS(1, 1); break;
      case 2: MESWITCH_AVX2INT_ROWS(2, 1); break;
      case 3: MESWITCH_AVX2INT_ROWS(3, 1); break;
      default: MESWITCH_AVX2INT_ROWS(4, 1); break;
    }
  } else {
    switch (n) {
      case 1: MESWITCH_AVX2INT_ROWS(1, 2); break;
      case 2: MESWITCH_AVX2INT_ROWS(2, 2); break;
      case 3: MESWITCH_AVX2INT_ROWS(3, 2); break;
      default: MESWITCH_AVX2INT_ROWS(4, 2); break;
    }
  }
#undef MESWITCH_AVX2INT_ROWS
}

}  // namespace meswitch::cpu::detail

#endif  // MESWITCH_X86_KERNELS
