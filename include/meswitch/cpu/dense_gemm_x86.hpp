// AVX2 and AVX-512 vector operations of the dense GEMM (cpu/dense_gemm.hpp draws the loop
// structure). The tile loop itself is written once, in dense_gemm_tile.inc, and compiled
// once per instruction set below, with that set's operations (Ops) and target attribute:
// a function compiled for baseline x86-64 cannot inline AVX intrinsics, so the loop cannot
// be a plain template over Ops. Called only after resolve_cpu_path() checked the CPU.
#pragma once

#if MESWITCH_X86_KERNELS

// GCC 12's false -Wmaybe-uninitialized inside AVX-512 intrinsics (see delta_gemm_x86.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define MESWITCH_DENSE_INLINE inline __attribute__((always_inline))

namespace meswitch::cpu::detail {

// Bytes ahead of the current step that the first token block of a row group prefetches:
// far enough to cover DRAM latency at one token's pace, near enough to stay in L1.
constexpr std::int64_t kDensePrefetchBytes = 768;

struct Avx2DenseOps {
  using Vector = __m256;
  static constexpr int kLanes = 8;
  // R*TB accumulators + R weight vectors + 1 x vector + the bf16 mask fit the 16 ymm
  // registers (measured: 6 tokens x 2 rows spill three accumulators to the stack).
  static constexpr int kMaxTokens = 4;
  static constexpr int rows_per_block(int tokens) { return tokens <= 2 ? 4 : 2; }

  MESWITCH_TARGET_AVX2 static MESWITCH_DENSE_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  // x for every row of a register block: pinned to a register (the empty asm), because a
  // compiler that folds it into each FMA loads it once per row, and on Zen 1 (two 128-bit
  // loads per cycle) those loads, not the FMAs, would then set the pace.
  MESWITCH_TARGET_AVX2 static MESWITCH_DENSE_INLINE __m256 load_shared(const float* p) {
    __m256 v = _mm256_loadu_ps(p);
    asm("" : "+x"(v));
    return v;
  }
  MESWITCH_TARGET_AVX2 static MESWITCH_DENSE_INLINE void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  MESWITCH_TARGET_AVX2 static MESWITCH_DENSE_INLINE __m256 fma(__m256 a, __m256 b, __m256 c) {
    return _mm256_fmadd_ps(a, b, c);
  }
  // Half H of the 16 weights of one step at p, as float (BF16: H = 0 the even columns,
  // H = 1 the odd ones; otherwise H = 0 the first 8, H = 1 the next 8).
  template <DType D, int H>
  MESWITCH_TARGET_AVX2 static MESWITCH_DENSE_INLINE __m256 weights(const unsigned char* p) {
    if constexpr (D == DType::F32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8 * H);
    } else if constexpr (D == DType::F16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + H));
    } else {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (H == 0) return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int(0xFFFF0000u))));
    }
  }
};

struct Avx512DenseOps {
  using Vector = __m512;
  static constexpr int kLanes = 16;
  // 4 x 6 accumulators + 4 weight vectors + 1 x vector + the bf16 mask: 30 of 32 zmm registers.
  static constexpr int kMaxTokens = 6;
  static constexpr int rows_per_block(int) { return 4; }

  MESWITCH_TARGET_AVX512 static MESWITCH_DENSE_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  MESWITCH_TARGET_AVX512 static MESWITCH_DENSE_INLINE __m512 load_shared(const float* p) {
    __m512 v = _mm512_loadu_ps(p);
    asm("" : "+v"(v));
    return v;
  }
  MESWITCH_TARGET_AVX512 static MESWITCH_DENSE_INLINE void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  MESWITCH_TARGET_AVX512 static MESWITCH_DENSE_INLINE __m512 fma(__m512 a, __m512 b, __m512 c) {
    return _mm512_fmadd_ps(a, b, c);
  }
  template <DType D, int H>
  MESWITCH_TARGET_AVX512 static MESWITCH_DENSE_INLINE __m512 weights(const unsigned char* p) {
    if constexpr (D == DType::F32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(p) + 16 * H);
    } else if constexpr (D == DType::F16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + H));
    } else {
      const __m512i pairs = _mm512_loadu_si512(p);
      if constexpr (H == 0) return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int(0xFFFF0000u))));
    }
  }
};

namespace avx2_dense {
using Ops = Avx2DenseOps;
#define MESWITCH_DENSE_TARGET MESWITCH_TARGET_AVX2
#include "meswitch/cpu/dense_gemm_tile.inc"
#undef MESWITCH_DENSE_TARGET
}  // namespace avx2_dense

namespace avx512_dense {
using Ops = Avx512DenseOps;
#define MESWITCH_DENSE_TARGET MESWITCH_TARGET_AVX512
#include "meswitch/cpu/dense_gemm_tile.inc"
#undef MESWITCH_DENSE_TARGET
}  // namespace avx512_dense

}  // namespace meswitch::cpu::detail

#undef MESWITCH_DENSE_INLINE

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MESWITCH_X86_KERNELS
