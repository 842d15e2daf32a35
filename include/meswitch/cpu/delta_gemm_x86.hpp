// AVX-512 and AVX2 kernels of cpu/delta_gemm.hpp (layout and the group trick are
// drawn there). Compiled per function for their instruction sets and only called
// after resolve_cpu_path() checked the CPU. detail::reference_rows is the spec these
// are tested against.
//
// What each piece buys:
// * Mask-in-place extraction: position p of a unit is `words & (mask << shift)`,
//   converted to float as code * 2^shift; x carries 2^-shift (exact). One AND + one
//   convert per vector of codes instead of shift + AND + convert.
// * The top position of a word (shift + bits = 32) is a plain right shift, so no
//   value ever has bit 31 set and the signed int->float convert is exact.
// * Token blocks (8 on AVX-512, 4 on AVX2) reuse each unpacked vector of codes for
//   several tokens from registers; one token keeps 4 independent accumulator chains
//   so the FMA latency does not serialise the loop.
// * Scales are applied once per block per lane (a permute of the row's float scales
//   picks each lane's group), zero points once per group through X_g.
#pragma once

#if MESWITCH_X86_KERNELS

// GCC 12 warns that the "undefined" pass-through operand inside many AVX-512
// intrinsics is uninitialised (a false positive fixed in GCC 13); the warning is
// attributed to immintrin's own lines, so it is silenced around its inclusion.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <utility>

#define MESWITCH_INLINE inline __attribute__((always_inline))

namespace meswitch::cpu::detail {

// ---------------------------------------------------------------- AVX-512 (16 lanes)

// int32 -> float through the vector extension rather than _mm512_cvtepi32_ps: same
// instruction, without GCC 12's false -Wmaybe-uninitialized from the intrinsic's
// undefined pass-through operand.
typedef int avx512_int32x16 __attribute__((vector_size(64)));
typedef float avx512_float32x16 __attribute__((vector_size(64)));
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __m512 avx512_to_float(__m512i v) {
  return __m512(__builtin_convertvector(avx512_int32x16(v), avx512_float32x16));
}

// The first n of 16 lanes (n clamped to [0, 16]).
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __mmask16 avx512_first_lanes(std::int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// Sixteen words, or only the first n of them for a row's last, partial block: a masked
// load never touches the lanes left out, not even to fault. It takes one more uop on the
// ports the FMAs and dot products need, so whole blocks take the plain load.
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __m512i avx512_load_words(const std::uint32_t* words, std::int64_t n) {
  if (n >= 16) return _mm512_loadu_si512(words);
  return _mm512_maskz_loadu_epi32(avx512_first_lanes(n), words);
}

// The words of one block for unit word J; `valid` words of the row remain from `words`.
template <int Bits, int J>
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __m512i avx512_unit_word(const std::uint32_t* words, std::int64_t valid) {
  if constexpr (Bits != 3) {
    return avx512_load_words(words, valid);
  } else {
    // Lane w needs word 3w + J of the 48 loaded: the first 32 come from a two-source
    // permute of v0:v1, lanes whose word lies in v2 are patched by a masked permute.
    const __m512i v0 = avx512_load_words(words, valid), v1 = avx512_load_words(words + 16, valid - 16),
                  v2 = avx512_load_words(words + 32, valid - 32);
    const __m512i index = _mm512_setr_epi32(J, 3 + J, 6 + J, 9 + J, 12 + J, 15 + J, 18 + J, 21 + J, 24 + J, 27 + J,
                                            30 + J, 33 + J, 36 + J, 39 + J, 42 + J, 45 + J);
    constexpr __mmask16 from_v2 = J == 2 ? 0xFC00 : 0xF800;  // lanes with 3w + J >= 32
    const __m512i low = _mm512_permutex2var_epi32(v0, index, v1);
    return _mm512_mask_permutexvar_epi32(low, from_v2, index, v2);
  }
}

template <int Bits, int P>
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __m512 avx512_codes(const __m512i* words) {
  using U = Unit<Bits>;
  constexpr int j = U::word(P), shift = U::shift(P);
  if constexpr (U::straddles(P)) {
    constexpr int low_bits = 32 - shift;
    const __m512i high = _mm512_and_si512(words[j + 1], _mm512_set1_epi32((1 << (Bits - low_bits)) - 1));
    return avx512_to_float(_mm512_or_si512(_mm512_srli_epi32(words[j], shift), _mm512_slli_epi32(high, low_bits)));
  } else if constexpr (U::top(P)) {
    return avx512_to_float(_mm512_srli_epi32(words[j], shift));
  } else {
    return avx512_to_float(_mm512_and_si512(words[j], _mm512_set1_epi32(int(((1u << Bits) - 1u) << shift))));
  }
}

template <int Bits, int TB, int C, int P>
MESWITCH_TARGET_AVX512 MESWITCH_INLINE void avx512_position(const __m512i* words, const float* const* x,
                                                            __m512 (&acc)[TB][C]) {
  const __m512 codes = avx512_codes<Bits, P>(words);
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t) acc[t][P % C] = _mm512_fmadd_ps(codes, _mm512_loadu_ps(x[t] + P * 16), acc[t][P % C]);
}

template <int Bits, int TB, int C, int... Ps>
MESWITCH_TARGET_AVX512 MESWITCH_INLINE void avx512_block(const __m512i* words, const float* const* x,
                                                         __m512 (&acc)[TB][C], std::integer_sequence<int, Ps...>) {
  (avx512_position<Bits, TB, C, Ps>(words, x, acc), ...);
}

// sum +/- a[0:n] * b[0:n] lane-wise, unreduced, so a row's terms share one reduction.
template <bool Subtract = false>
MESWITCH_TARGET_AVX512 MESWITCH_INLINE __m512 avx512_fma_span(const float* a, const float* b, std::int64_t n, __m512 sum) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(mask, a + i), y = _mm512_maskz_loadu_ps(mask, b + i);
    sum = Subtract ? _mm512_fnmadd_ps(x, y, sum) : _mm512_fmadd_ps(x, y, sum);
  }
  return sum;
}

// f16 -> float for n values, 16 at a time (vcvtph2ps).
MESWITCH_TARGET_AVX512 inline void avx512_widen_f16(const std::uint16_t* source, std::int64_t n, float* destination) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    _mm512_storeu_ps(destination + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, source + i)));
  }
}

// Blocks [block_begin, block_end) of every row in the tile for tokens [t0, t0 + TB):
// per-lane partial sums live in scratch between column chunks.
template <int Bits, int TB>
MESWITCH_TARGET_AVX512 void avx512_chunk(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                         std::int64_t row_end, std::int64_t t0, std::int64_t block_begin,
                                         std::int64_t block_end, TileScratch& scratch) {
  using U = Unit<Bits>;
  constexpr int C = TB == 1 ? 4 : (TB == 2 ? 2 : 1);  // independent FMA chains per token
  const std::int64_t block_cols = prep.block_cols, words = delta.words_per_row();
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    const std::uint32_t* row = delta.qweight + r * words;
    const float* scales = scratch.row_scales(r - row_begin);
    float* totals = scratch.row_totals(r - row_begin);
    __m512 total[TB];
    for (int t = 0; t < TB; ++t) total[t] = block_begin == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(totals + t * 16);
    for (std::int64_t b = block_begin; b < block_end; ++b) {
      const std::uint32_t* block_words = row + b * 16 * U::kWords;
      const std::int64_t valid = words - b * 16 * U::kWords;
      __m512i words_of_lane[U::kWords];
      words_of_lane[0] = avx512_unit_word<Bits, 0>(block_words, valid);
      if constexpr (U::kWords == 3) {
        words_of_lane[1] = avx512_unit_word<Bits, 1>(block_words, valid);
        words_of_lane[2] = avx512_unit_word<Bits, 2>(block_words, valid);
      }
      __m512 acc[TB][C];
      for (int t = 0; t < TB; ++t)
        for (int c = 0; c < C; ++c) acc[t][c] = _mm512_setzero_ps();
      const float* xb[TB];
      for (int t = 0; t < TB; ++t) xb[t] = prep.permuted.data() + (b * prep.tokens + t0 + t) * block_cols;
      avx512_block<Bits, TB, C>(words_of_lane, xb, acc, std::make_integer_sequence<int, U::kCodes>{});
      const __m512i lane_group = _mm512_loadu_si512(prep.lane_group.data() + b * 16);
      const __m512 lane_scale =
          _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(scales + prep.first_group[std::size_t(b)]));
      for (int t = 0; t < TB; ++t) {
        __m512 sum = acc[t][0];
        for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, acc[t][c]);
        total[t] = _mm512_fmadd_ps(lane_scale, sum, total[t]);
      }
    }
    for (int t = 0; t < TB; ++t) _mm512_storeu_ps(totals + t * 16, total[t]);
  }
}

// delta_gemm_vnni.hpp: blocks [b0, b1) of the tile's rows for n tokens from t0.
inline std::int64_t vnni_token_block(int digit_count);
template <int Bits>
MESWITCH_TARGET_AVX512_VNNI void vnni_chunk(const CompressedDelta& delta, const PreparedTokens& prep,
                                            std::int64_t row_begin, std::int64_t row_end, std::int64_t t0,
                                            std::int64_t n, std::int64_t b0, std::int64_t b1, TileScratch& scratch);

// The scales, zeros and salient values of the tile after [row_begin, row_end), into
// cache while this one computes: short bursts from three arrays that the hardware
// prefetcher does not see coming at the start of each tile.
MESWITCH_TARGET_AVX2 inline void prefetch_next_tile_constants(const CompressedDelta& delta, std::int64_t row_begin,
                                                             std::int64_t row_end) {
  const std::int64_t next_end = std::min(delta.rows, 2 * row_end - row_begin), groups = delta.groups();
  if (next_end <= row_end) return;
  auto fetch = [](const void* begin, std::int64_t bytes) {
    for (std::int64_t at = 0; at < bytes; at += 64)
      _mm_prefetch(static_cast<const char*>(begin) + at, _MM_HINT_T0);
  };
  fetch(delta.scales + row_end * groups, (next_end - row_end) * groups * 2);
  fetch(delta.zeros + row_end * groups, (next_end - row_end) * groups);
  if (delta.k > 0) fetch(delta.salient + row_end * delta.k, (next_end - row_end) * delta.k * 2);
}

// One row tile: row constants, then per token block the column chunks (float FMA
// kernel, or with Vnni the integer kernel of delta_gemm_vnni.hpp), then per row and
// token the lane sums, the zero points, the salient channels and (only for group sizes
// the lanes do not fit) the scalar path.
template <int Bits, bool Vnni = false>
MESWITCH_TARGET_AVX512 void avx512_rows(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                        std::int64_t row_end, float* y, std::int64_t y_row_stride, TileScratch& scratch) {
  const std::int64_t token_block = Vnni ? vnni_token_block(prep.digit_count) : 8;
  const std::int64_t groups = prep.groups, words = delta.words_per_row();
  // The tile's constants as float, in one pass over its contiguous rows, for all tokens.
  scratch.layout(groups, delta.k);
  const std::int64_t tile_groups = (row_end - row_begin) * groups;
  avx512_widen_f16(delta.scales + row_begin * groups, tile_groups, scratch.scales.data());
  for (std::int64_t g = 0; g < tile_groups; g += 16) {
    const __mmask16 mask = tile_groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (tile_groups - g)) - 1u);
    const __m512 zero = avx512_to_float(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, delta.zeros + row_begin * groups + g)));
    _mm512_storeu_ps(scratch.scaled_zeros.data() + g, _mm512_mul_ps(zero, _mm512_loadu_ps(scratch.scales.data() + g)));
  }
  if (delta.k > 0) avx512_widen_f16(delta.salient + row_begin * delta.k, (row_end - row_begin) * delta.k, scratch.salient.data());
  prefetch_next_tile_constants(delta, row_begin, row_end);
  const std::int64_t blocks = prep.blocks, tail_begin = blocks * prep.block_cols;
  for (std::int64_t t0 = 0; t0 < prep.tokens; t0 += token_block) {
    const std::int64_t n = std::min(token_block, prep.tokens - t0);
    const std::int64_t step = chunk_blocks(n, Vnni ? prep.digit_count * (8 / Bits) * 64 : prep.block_cols * 4);
    for (std::int64_t b0 = 0; b0 < blocks; b0 += step) {
      const std::int64_t b1 = std::min(blocks, b0 + step);
      if constexpr (Vnni) {
        vnni_chunk<Bits>(delta, prep, row_begin, row_end, t0, n, b0, b1, scratch);
        continue;
      }
      switch (n) {
        case 1: avx512_chunk<Bits, 1>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 2: avx512_chunk<Bits, 2>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 3: avx512_chunk<Bits, 3>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 4: avx512_chunk<Bits, 4>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 5: avx512_chunk<Bits, 5>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 6: avx512_chunk<Bits, 6>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 7: avx512_chunk<Bits, 7>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        default: avx512_chunk<Bits, 8>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
      }
    }
    // Per row and token: lane sums, minus sum_g s_g z_g X_g, plus salient, in one vector
    // and one reduction; then the scalar path when the lanes do not fit the groups.
    for (std::int64_t r = row_begin; r < row_end; ++r) {
      const std::int64_t i = r - row_begin;
      const std::uint32_t* row = delta.qweight + r * words;
      for (std::int64_t t = 0; t < n; ++t) {
        const std::int64_t token = t0 + t;
        __m512 sum = blocks > 0 ? _mm512_loadu_ps(scratch.row_totals(i) + t * 16) : _mm512_setzero_ps();
        sum = avx512_fma_span<true>(scratch.row_scaled_zeros(i), prep.group_sums.data() + token * groups, groups, sum);
        sum = avx512_fma_span(scratch.row_salient(i), prep.salient_x.data() + token * prep.k, prep.k, sum);
        float value = _mm512_reduce_add_ps(sum);
        if (tail_begin < delta.cols)
          value += tail_dot(delta, row, scratch.row_scales(i), prep.x.data() + token * prep.x_stride, tail_begin);
        y[token * y_row_stride + r] += value;
      }
    }
  }
}

// ---------------------------------------------------------------- AVX2 (8 lanes)

// Lanes of word 3w + J among 24 words for 3 bits: which lanes come from the second
// and third vector (the index into each vector is the same (3w + J) % 8).
constexpr int avx2_blend_mask(int j, int source) {
  int mask = 0;
  for (int w = 0; w < 8; ++w)
    if ((3 * w + j) / 8 == source) mask |= 1 << w;
  return mask;
}

// Eight words, or only the first n of them (clamped to [0, 8]) for a row's last, partial
// block: vpmaskmovd never touches the lanes left out, not even to fault. It costs more
// than a plain load, so whole blocks take the plain one.
MESWITCH_TARGET_AVX2 MESWITCH_INLINE __m256i avx2_load_words(const std::uint32_t* words, std::int64_t n) {
  if (n >= 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::max<std::int64_t>(n, 0))),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(words), mask);
}

// The words of one block for unit word J; `valid` words of the row remain from `words`.
template <int Bits, int J>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE __m256i avx2_unit_word(const std::uint32_t* words, std::int64_t valid) {
  if constexpr (Bits != 3) {
    return avx2_load_words(words, valid);
  } else {
    const __m256i index = _mm256_setr_epi32(J % 8, (3 + J) % 8, (6 + J) % 8, (9 + J) % 8, (12 + J) % 8, (15 + J) % 8,
                                            (18 + J) % 8, (21 + J) % 8);
    const __m256i a = _mm256_permutevar8x32_epi32(avx2_load_words(words, valid), index);
    const __m256i b = _mm256_permutevar8x32_epi32(avx2_load_words(words + 8, valid - 8), index);
    const __m256i c = _mm256_permutevar8x32_epi32(avx2_load_words(words + 16, valid - 16), index);
    return _mm256_blend_epi32(_mm256_blend_epi32(a, b, avx2_blend_mask(J, 1)), c, avx2_blend_mask(J, 2));
  }
}

template <int Bits, int P>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE __m256 avx2_codes(const __m256i* words) {
  using U = Unit<Bits>;
  constexpr int j = U::word(P), shift = U::shift(P);
  if constexpr (U::straddles(P)) {
    constexpr int low_bits = 32 - shift;
    const __m256i high = _mm256_and_si256(words[j + 1], _mm256_set1_epi32((1 << (Bits - low_bits)) - 1));
    return _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(words[j], shift), _mm256_slli_epi32(high, low_bits)));
  } else if constexpr (U::top(P)) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(words[j], shift));
  } else {
    return _mm256_cvtepi32_ps(_mm256_and_si256(words[j], _mm256_set1_epi32(int(((1u << Bits) - 1u) << shift))));
  }
}

template <int Bits, int TB, int C, int P>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE void avx2_position(const __m256i* words, const float* const* x, __m256 (&acc)[TB][C]) {
  const __m256 codes = avx2_codes<Bits, P>(words);
#pragma GCC unroll 4
  for (int t = 0; t < TB; ++t) acc[t][P % C] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(x[t] + P * 8), acc[t][P % C]);
}

template <int Bits, int TB, int C, int... Ps>
MESWITCH_TARGET_AVX2 MESWITCH_INLINE void avx2_block(const __m256i* words, const float* const* x, __m256 (&acc)[TB][C],
                                                     std::integer_sequence<int, Ps...>) {
  (avx2_position<Bits, TB, C, Ps>(words, x, acc), ...);
}

MESWITCH_TARGET_AVX2 MESWITCH_INLINE float avx2_reduce_add(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

MESWITCH_TARGET_AVX2 inline float avx2_dot(const float* a, const float* b, std::int64_t n) {
  __m256 sum = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), sum);
  float value = avx2_reduce_add(sum);
  for (; i < n; ++i) value += a[i] * b[i];
  return value;
}

MESWITCH_TARGET_AVX2 inline void avx2_widen_f16(const std::uint16_t* source, std::int64_t n, float* destination) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(destination + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i))));
  for (; i < n; ++i) destination[i] = _cvtsh_ss(source[i]);
}

// As avx512_chunk with 8 lanes.
template <int Bits, int TB>
MESWITCH_TARGET_AVX2 void avx2_chunk(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                         std::int64_t row_end, std::int64_t t0, std::int64_t block_begin,
                                         std::int64_t block_end, TileScratch& scratch) {
  using U = Unit<Bits>;
  constexpr int C = TB == 1 ? 4 : (TB == 2 ? 2 : 1);  // independent FMA chains per token
  const std::int64_t block_cols = prep.block_cols, words = delta.words_per_row();
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    const std::uint32_t* row = delta.qweight + r * words;
    const float* scales = scratch.row_scales(r - row_begin);
    float* totals = scratch.row_totals(r - row_begin);
    __m256 total[TB];
    for (int t = 0; t < TB; ++t) total[t] = block_begin == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(totals + t * 8);
    for (std::int64_t b = block_begin; b < block_end; ++b) {
      const std::uint32_t* block_words = row + b * 8 * U::kWords;
      const std::int64_t valid = words - b * 8 * U::kWords;
      __m256i words_of_lane[U::kWords];
      words_of_lane[0] = avx2_unit_word<Bits, 0>(block_words, valid);
      if constexpr (U::kWords == 3) {
        words_of_lane[1] = avx2_unit_word<Bits, 1>(block_words, valid);
        words_of_lane[2] = avx2_unit_word<Bits, 2>(block_words, valid);
      }
      __m256 acc[TB][C];
      for (int t = 0; t < TB; ++t)
        for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
      const float* xb[TB];
      for (int t = 0; t < TB; ++t) xb[t] = prep.permuted.data() + (b * prep.tokens + t0 + t) * block_cols;
      avx2_block<Bits, TB, C>(words_of_lane, xb, acc, std::make_integer_sequence<int, U::kCodes>{});
      const __m256i lane_group = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(prep.lane_group.data() + b * 8));
      const __m256 lane_scale =
          _mm256_permutevar8x32_ps(_mm256_loadu_ps(scales + prep.first_group[std::size_t(b)]), lane_group);
      for (int t = 0; t < TB; ++t) {
        __m256 sum = acc[t][0];
        for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[t][c]);
        total[t] = _mm256_fmadd_ps(lane_scale, sum, total[t]);
      }
    }
    for (int t = 0; t < TB; ++t) _mm256_storeu_ps(totals + t * 8, total[t]);
  }
}

// delta_gemm_avx2int.hpp: blocks [b0, b1) of the tile's rows for n tokens from t0.
template <int Bits>
MESWITCH_TARGET_AVX2 void avx2int_chunk(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                        std::int64_t row_end, std::int64_t t0, std::int64_t n, std::int64_t b0,
                                        std::int64_t b1, TileScratch& scratch);

// As avx512_rows with 8 lanes; with Int the integer kernel of delta_gemm_avx2int.hpp.
template <int Bits, bool Int = false>
MESWITCH_TARGET_AVX2 void avx2_rows(const CompressedDelta& delta, const PreparedTokens& prep, std::int64_t row_begin,
                                        std::int64_t row_end, float* y, std::int64_t y_row_stride, TileScratch& scratch) {
  constexpr std::int64_t kTokenBlock = 4;
  const std::int64_t groups = prep.groups, words = delta.words_per_row();
  // The tile's constants as float, in one pass over its contiguous rows, for all tokens.
  scratch.layout(groups, delta.k);
  const std::int64_t tile_groups = (row_end - row_begin) * groups;
  const float* scales = scratch.scales.data();
  avx2_widen_f16(delta.scales + row_begin * groups, tile_groups, scratch.scales.data());
  const std::uint8_t* zeros = delta.zeros + row_begin * groups;
  float* scaled_zeros = scratch.scaled_zeros.data();
  std::int64_t g = 0;
  for (; g + 8 <= tile_groups; g += 8) {
    const __m256 zero =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g))));
    _mm256_storeu_ps(scaled_zeros + g, _mm256_mul_ps(zero, _mm256_loadu_ps(scales + g)));
  }
  for (; g < tile_groups; ++g) scaled_zeros[g] = float(zeros[g]) * scales[g];
  if (delta.k > 0) avx2_widen_f16(delta.salient + row_begin * delta.k, (row_end - row_begin) * delta.k, scratch.salient.data());
  prefetch_next_tile_constants(delta, row_begin, row_end);
  const std::int64_t blocks = prep.blocks, tail_begin = blocks * prep.block_cols;
  for (std::int64_t t0 = 0; t0 < prep.tokens; t0 += kTokenBlock) {
    const std::int64_t n = std::min(kTokenBlock, prep.tokens - t0);
    const std::int64_t step = chunk_blocks(n, Int ? prep.digit_count * (8 / Bits) * 32 : prep.block_cols * 4);
    for (std::int64_t b0 = 0; b0 < blocks; b0 += step) {
      const std::int64_t b1 = std::min(blocks, b0 + step);
      if constexpr (Int) {
        avx2int_chunk<Bits>(delta, prep, row_begin, row_end, t0, n, b0, b1, scratch);
        continue;
      }
      switch (n) {
        case 1: avx2_chunk<Bits, 1>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 2: avx2_chunk<Bits, 2>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        case 3: avx2_chunk<Bits, 3>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
        default: avx2_chunk<Bits, 4>(delta, prep, row_begin, row_end, t0, b0, b1, scratch); break;
      }
    }
    for (std::int64_t r = row_begin; r < row_end; ++r) {
      const std::int64_t i = r - row_begin;
      const std::uint32_t* row = delta.qweight + r * words;
      for (std::int64_t t = 0; t < n; ++t) {
        const std::int64_t token = t0 + t;
        float value = blocks > 0 ? avx2_reduce_add(_mm256_loadu_ps(scratch.row_totals(i) + t * 8)) : 0.0f;
        if (tail_begin < delta.cols)
          value += tail_dot(delta, row, scratch.row_scales(i), prep.x.data() + token * prep.x_stride, tail_begin);
        value -= avx2_dot(scratch.row_scaled_zeros(i), prep.group_sums.data() + token * groups, groups);
        if (prep.k > 0) value += avx2_dot(scratch.row_salient(i), prep.salient_x.data() + token * prep.k, prep.k);
        y[token * y_row_stride + r] += value;
      }
    }
  }
}

}  // namespace meswitch::cpu::detail

// Inside this file's warning and MESWITCH_INLINE scope:
#include "meswitch/cpu/delta_gemm_digits.hpp"
#include "meswitch/cpu/delta_gemm_vnni.hpp"
#include "meswitch/cpu/delta_gemm_avx2int.hpp"

#undef MESWITCH_INLINE

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MESWITCH_X86_KERNELS
