// Bit-exact conversions between float and the 16-bit formats used by checkpoints.
//
// f32 -> f16 and f32 -> bf16 round to nearest, ties to even, exactly as NumPy's
// `astype(np.float16)` and PyTorch's `.to(torch.bfloat16)` do: the tests compare all
// 65,536 half patterns and random floats bit for bit. NaN stays NaN with its sign
// (f16 keeps its payload as NumPy does), overflow goes to +-Inf, tiny values become (signed) subnormals or zero.
#pragma once

#include <cstdint>
#include <cstring>

namespace meswitch {

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_to_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// bfloat16 is the top half of an IEEE float32, so widening is a shift.
inline float bf16_to_float(std::uint16_t bf16) { return bits_to_float(std::uint32_t(bf16) << 16); }

inline std::uint16_t float_to_bf16(float value) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep sign and top payload bits, force quiet so truncation cannot yield Inf.
    return std::uint16_t((bits >> 16) | 0x0040u);
  }
  // Adding 0x7fff plus the lowest kept bit rounds to nearest with ties to even;
  // a carry into the exponent correctly rounds the largest finite values to Inf.
  const std::uint32_t lsb = (bits >> 16) & 1u;
  return std::uint16_t((bits + 0x7fffu + lsb) >> 16);
}

inline float f16_to_float(std::uint16_t half) {
  const std::uint32_t sign = std::uint32_t(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  std::uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // Inf/NaN
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);  // signed zero
  // Subnormal half: normalise the mantissa into a float32 normal number.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  mantissa &= 0x3ffu;
  return bits_to_float(sign | (std::uint32_t(113 - shift) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_f16(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;

  if (magnitude > 0x7f800000u) {
    // NaN: keep the top payload bits as NumPy does, never letting them become zero (Inf).
    const std::uint16_t payload = std::uint16_t((magnitude >> 13) & 0x3ffu);
    return std::uint16_t(sign | 0x7c00u | (payload == 0 ? 1u : payload));
  }
  if (magnitude >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf

  const std::uint32_t exponent = magnitude >> 23;
  if (exponent >= 113) {
    // Normal half. Re-bias the exponent and round the 13 dropped mantissa bits.
    const std::uint32_t rebased = magnitude - (112u << 23);
    const std::uint32_t lsb = (rebased >> 13) & 1u;
    return std::uint16_t(sign | ((rebased + 0xfffu + lsb) >> 13));
  }
  if (exponent < 102) return sign;  // below half the smallest subnormal: rounds to zero

  // Subnormal half: shift the full 24-bit significand right, rounding ties to even.
  const std::uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exponent;  // 14..24
  const std::uint32_t kept = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  std::uint32_t rounded = kept;
  if (remainder > halfway || (remainder == halfway && (kept & 1u))) ++rounded;
  return std::uint16_t(sign | rounded);
}

}  // namespace meswitch
