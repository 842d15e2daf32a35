// AVX-512 VNNI path of cpu/delta_gemm.hpp: integer dot products straight from the
// packed bytes, for 1-, 2- and 4-bit codes. Included from delta_gemm_x86.hpp (whose
// helpers it uses); needs AVX-512 VNNI and GFNI at run time (cpu/simd.hpp checks).
//
// Why. The float paths spend one FMA per 16 codes per token, plus the unpacking, so
// a 2-bit delta is bound by vector throughput at about a fifth of what the memory
// can deliver. `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds
// each group of four into an int32 lane: 64 codes per instruction.
//
// Activations as int8 digits (delta_gemm_digits.hpp, shared with the AVX2 integer path):
// per token and 64-byte block of codes, x as one or two int8 digits, within
// max|x| / 32512 of its block with two (the default) and max|x| / 254 with one.
// 128 * dot(codes, hi) + dot(codes, lo) is exact in int32 (at most 2e6 per lane per block).
//
// Layout (delta_gemm_digits.hpp): byte j of a 64-byte block holds the codes of columns
// (8 / Bits) * j + p, position p at bits [p * Bits, (p + 1) * Bits), and the digits of
// position p are stored in the same byte order. One GFNI affine transform
// (vgf2p8affineqb) extracts position p of all 64 bytes: its bits moved to the bottom of
// each byte, the rest cleared, so a lane's four bytes line up with the four x digits they
// multiply. Lane l (bytes 4l .. 4l+3) covers 32 / Bits consecutive columns: the same
// lanes as the float paths, so the lane groups, scales and tails are shared.
#pragma once

#if MESWITCH_X86_KERNELS

#include <cstdint>

namespace meswitch::cpu::detail {

inline std::int64_t vnni_token_block(int digit_count) { return digit_count == 2 ? 4 : 8; }

// The GF(2) affine matrix that moves bits [p * Bits, (p + 1) * Bits) of every byte to
// bits [0, Bits) and clears the rest: output bit b of a byte is the parity of (matrix
// byte 7 - b AND input byte), so matrix byte 7 - b holds the single input bit p * Bits + b.
template <int Bits>
constexpr long long extract_matrix(int p) {
  std::uint64_t matrix = 0;
  for (int b = 0; b < Bits; ++b) matrix |= (std::uint64_t(1) << (p * Bits + b)) << (8 * (7 - b));
  return static_cast<long long>(matrix);
}

// Rows [r0, r0 + R) of the tile for tokens [t0, t0 + TB) over blocks [block_begin,
// block_end), x as Digits int8 digits. The R rows share every load of x: at one token
// the x digits (4 or 8 bytes per code byte for 2 bits) outweigh the codes. The
// per-lane float partial sums live in scratch between column chunks, exactly as in
// avx512_chunk.
template <int Bits, int TB, int R, int Digits>
MESWITCH_TARGET_AVX512_VNNI MESWITCH_INLINE void vnni_row_group(const CompressedDelta& delta, const PreparedTokens& prep,
                                                                std::int64_t row_begin, std::int64_t r0, std::int64_t t0,
                                                                std::int64_t block_begin, std::int64_t block_end,
                                                                TileScratch& scratch) {
  constexpr int kPerByte = 8 / Bits;
  constexpr std::int64_t kBlockBytes = Digits * kPerByte * 64;
  const std::int64_t words = delta.words_per_row(), tokens = prep.tokens;
  const std::uint32_t* row[R];
  const float* scales[R];
  __m512 total[R][TB];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    row[i] = delta.qweight + (r0 + i) * words;
    scales[i] = scratch.row_scales(r0 + i - row_begin);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t)
      total[i][t] = block_begin == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(scratch.row_totals(r0 + i - row_begin) + t * 16);
  }
  for (std::int64_t b = block_begin; b < block_end; ++b) {
    __m512i packed[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      // The same block of the next row group: the hardware prefetcher alone leaves DRAM
      // idle between the short rows of a one-token call.
      _mm_prefetch(reinterpret_cast<const char*>(row[i] + R * words + b * 16), _MM_HINT_T0);
      packed[i] = avx512_load_words(row[i] + b * 16, words - b * 16);  // the row's last block may be partial
    }
    const std::int8_t* x = prep.digits.data() + (b * tokens + t0) * kBlockBytes;
    __m512i hi[R][TB], lo[R][TB];  // sums of codes * hi digit and codes * lo digit (2 digits only)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) hi[i][t] = lo[i][t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int p = 0; p < kPerByte; ++p) {
      __m512i codes[R];
      const __m512i select = _mm512_set1_epi64(extract_matrix<Bits>(p));
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) codes[i] = _mm512_gf2p8affine_epi64_epi8(packed[i], select, 0);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const __m512i x_hi = _mm512_loadu_si512(x + t * kBlockBytes + p * 64);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) hi[i][t] = _mm512_dpbusd_epi32(hi[i][t], codes[i], x_hi);
        if constexpr (Digits == 2) {
          const __m512i x_lo = _mm512_loadu_si512(x + t * kBlockBytes + (kPerByte + p) * 64);
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i) lo[i][t] = _mm512_dpbusd_epi32(lo[i][t], codes[i], x_lo);
        }
      }
    }
    const __m512i lane_group = _mm512_loadu_si512(prep.lane_group.data() + b * 16);
    const float* digit_scale = prep.digit_scales.data() + b * tokens + t0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 lane_scale = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(scales[i] + prep.first_group[std::size_t(b)]));
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        __m512i sum = hi[i][t];
        if constexpr (Digits == 2) sum = _mm512_add_epi32(_mm512_slli_epi32(sum, kDigitShift), lo[i][t]);
        total[i][t] = _mm512_fmadd_ps(avx512_to_float(sum), _mm512_mul_ps(lane_scale, _mm512_set1_ps(digit_scale[t])), total[i][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) _mm512_storeu_ps(scratch.row_totals(r0 + i - row_begin) + t * 16, total[i][t]);
}

// Every row of the tile: rows in groups of R sharing each x load, as many as the
// accumulators (R rows x TB tokens x Digits) leave room for in 32 vector registers.
template <int Bits, int TB, int Digits>
MESWITCH_TARGET_AVX512_VNNI void vnni_rows(const CompressedDelta& delta, const PreparedTokens& prep,
                                           std::int64_t row_begin, std::int64_t row_end, std::int64_t t0,
                                           std::int64_t block_begin, std::int64_t block_end, TileScratch& scratch) {
  constexpr int R = TB * Digits <= 2 ? 4 : (TB * Digits <= 4 ? 2 : 1);
  std::int64_t r = row_begin;
  for (; r + R <= row_end; r += R)
    vnni_row_group<Bits, TB, R, Digits>(delta, prep, row_begin, r, t0, block_begin, block_end, scratch);
  for (; r < row_end; ++r)
    vnni_row_group<Bits, TB, 1, Digits>(delta, prep, row_begin, r, t0, block_begin, block_end, scratch);
}

// n tokens from t0: up to 8 with one digit, up to 4 with two (more would spill the
// accumulators); avx512_rows hands out token blocks of that size (vnni_token_block).
template <int Bits>
MESWITCH_TARGET_AVX512_VNNI void vnni_chunk(const CompressedDelta& delta, const PreparedTokens& prep,
                                            std::int64_t row_begin, std::int64_t row_end, std::int64_t t0,
                                            std::int64_t n, std::int64_t b0, std::int64_t b1, TileScratch& scratch) {
#define MESWITCH_VNNI_ROWS(TB, DIGITS) \
  vnni_rows<Bits, TB, DIGITS>(delta, prep, row_begin, row_end, t0, b0, b1, scratch)
  if (prep.digit_count == 1) {
    switch (n) {
      case 1: MESWITCH_VNNI_ROWS(1, 1); break;
      case 2: MESWITCH_VNNI_ROWS(2, 1); break;
      case 3: MESWITCH_VNNI_ROWS(3, 1); break;
      case 4: MESWITCH_VNNI_ROWS(4, 1); break;
      case 5: MESWITCH_VNNI_ROWS(5, 1); break;
      case 6: MESWITCH_VNNI_ROWS(6, 1); break;
      case 7: MESWITCH_VNNI_ROWS(7, 1); break;
      default: MESWITCH_VNNI_ROWS(8, 1); break;
    }
  } else {
    switch (n) {
      case 1: MESWITCH_VNNI_ROWS(1, 2); break;
      case 2: MESWITCH_VNNI_ROWS(2, 2); break;
      case 3: MESWITCH_VNNI_ROWS(3, 2); break;
      default: MESWITCH_VNNI_ROWS(4, 2); break;
    }
  }
#undef MESWITCH_VNNI_ROWS
}

}  // namespace meswitch::cpu::detail

#endif  // MESWITCH_X86_KERNELS
