// Activations as int8 digits for the integer paths of cpu/delta_gemm.hpp (AVX-512 VNNI,
// delta_gemm_vnni.hpp; AVX2, delta_gemm_avx2int.hpp): one rule and one layout, written
// once for both. Included from delta_gemm_x86.hpp; AVX2 code, so it runs on either CPU.
//
// The rule. Per token and per block of packed code bytes (64 bytes on AVX-512, 32 on
// AVX2: block_cols columns), x is scaled by s = max|x| / 127 and, with two digits (the
// default), split as
//
//     x / s = hi + lo / 128,   hi = round(x / s) in [-127, 127],  lo in [-64, 64]
//
// so every x is represented to within s / 256 = max|x| / 32512 of its block: finer
// than a bf16 activation (2^-9 relative to each value) for all values above 1/64 of
// the block maximum. Both digits go through the same code bytes, and
// 128 * dot(codes, hi) + dot(codes, lo) is exact in int32. With one digit
// (MESWITCH_ACTIVATION_DIGITS=1) only hi is kept: within s / 2 = max|x| / 254, half the
// multiplies. The zero points use the exact float X_g (the group trick), the salient
// channels and the scalar tail the exact float x; only the code dot products see the
// digits. Non-finite x in a block makes that block's contribution NaN.
//
// The layout. Byte j of a block of B code bytes holds the codes of columns
// (8 / Bits) * j + p for positions p = 0 .. 8/Bits - 1, code p at bits [p * Bits, (p + 1)
// * Bits). The digits are stored per position in the same byte order
// ([block][token][digit][position][B]), so once position p of every code byte is
// extracted, byte j of the codes and byte j of the digits belong to the same column.
#pragma once

#if MESWITCH_X86_KERNELS

#include <cstdint>
#include <limits>

namespace meswitch::cpu::detail {

constexpr int kDigitShift = 7;  // lo digit weight 1/128

// 32 int32 values (each within int8) as 32 bytes in the same order. packs_epi32 then
// packs_epi16 interleave the 128-bit halves of the four vectors; the permute puts their
// 32-bit groups of bytes back in order.
MESWITCH_TARGET_AVX2 MESWITCH_INLINE __m256i avx2_pack_bytes(const __m256i (&v)[4]) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Fills prep.digits and prep.digit_scales for the blocks in prep (its lanes are the 32-bit
// words of one block: B = 4 * lanes). Vectorised by hand: this runs on every call, for
// every token.
MESWITCH_TARGET_AVX2 inline void quantize_digits(int bits, int digit_count, PreparedTokens& prep) {
  constexpr std::int64_t kMaxBlockCols = TileScratch::kMaxLanes * 32;  // 16 words of 1-bit codes
  const int per_byte = 8 / bits;
  const std::int64_t blocks = prep.blocks, tokens = prep.tokens, block_cols = prep.block_cols;
  const std::int64_t block_bytes = prep.lanes * 4, digit_bytes = digit_count * block_cols;
  prep.digit_count = digit_count;
  prep.digits.resize(std::size_t(blocks * tokens * digit_bytes));
  prep.digit_scales.resize(std::size_t(blocks * tokens));
  const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 lo_weight = _mm256_set1_ps(float(1 << kDigitShift));
  const __m256 top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  alignas(32) std::int8_t natural[2][kMaxBlockCols];  // [digit][column of the block]
  for (std::int64_t b = 0; b < blocks; ++b)
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float* x = prep.x.data() + t * prep.x_stride + b * block_cols;  // zero past cols
      std::int8_t* digits = prep.digits.data() + (b * tokens + t) * digit_bytes;
      __m256 largest = _mm256_setzero_ps(), poison = _mm256_setzero_ps();  // x * 0 is NaN for NaN and Inf
      for (std::int64_t c = 0; c < block_cols; c += 8) {
        const __m256 value = _mm256_loadu_ps(x + c);
        largest = _mm256_max_ps(largest, _mm256_and_ps(value, magnitude_mask));
        poison = _mm256_add_ps(poison, _mm256_mul_ps(value, _mm256_setzero_ps()));
      }
      alignas(32) float lanes[2][8];
      _mm256_store_ps(lanes[0], largest);
      _mm256_store_ps(lanes[1], poison);
      float block_max = 0, poison_sum = 0;
      for (int i = 0; i < 8; ++i) block_max = std::max(block_max, lanes[0][i]), poison_sum += lanes[1][i];
      const bool finite = poison_sum == 0.0f;
      float& scale = prep.digit_scales[std::size_t(b * tokens + t)];
      if (!finite || block_max == 0) {  // digits 0; non-finite x poisons the block with NaN
        std::fill(digits, digits + digit_bytes, std::int8_t(0));
        scale = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      scale = block_max / 127.0f / float(digit_count == 2 ? 1 << kDigitShift : 1);
      const __m256 inverse = _mm256_set1_ps(127.0f / block_max);
      // Both digits of 32 columns at a time in column order, then moved to their positions.
      for (std::int64_t c = 0; c < block_cols; c += 32) {
        __m256i high[4], low[4];
        for (int i = 0; i < 4; ++i) {
          const __m256 value =
              _mm256_min_ps(top, _mm256_max_ps(bottom, _mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * i), inverse)));
          const __m256 rounded = _mm256_round_ps(value, kNearest);
          high[i] = _mm256_cvtps_epi32(rounded);
          low[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(value, rounded), lo_weight), kNearest));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(natural[0] + c), avx2_pack_bytes(high));
        _mm256_store_si256(reinterpret_cast<__m256i*>(natural[1] + c), avx2_pack_bytes(low));
      }
      for (int d = 0; d < digit_count; ++d)
        for (int p = 0; p < per_byte; ++p) {
          std::int8_t* out = digits + (d * per_byte + p) * block_bytes;
          for (std::int64_t j = 0; j < block_bytes; ++j) out[j] = natural[d][per_byte * j + p];
        }
    }
}

}  // namespace meswitch::cpu::detail

#endif  // MESWITCH_X86_KERNELS
