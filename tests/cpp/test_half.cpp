#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "meswitch/half.hpp"

using namespace meswitch;

TEST_CASE("every f16 value widens and narrows back to the same bits", "[half]") {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto half = std::uint16_t(bits);
    const float value = f16_to_float(half);
    const bool is_nan = (half & 0x7c00u) == 0x7c00u && (half & 0x3ffu) != 0;
    if (is_nan) REQUIRE(std::isnan(value));
    REQUIRE(float_to_f16(value) == half);  // NaN payloads survive the round trip too
  }
}

TEST_CASE("every bf16 value widens and narrows back to the same bits", "[half]") {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto bf16 = std::uint16_t(bits);
    const float value = bf16_to_float(bf16);
    if (std::isnan(value)) {
      REQUIRE((float_to_bf16(value) | 0x0040u) == (bf16 | 0x0040u));
    } else {
      REQUIRE(float_to_bf16(value) == bf16);
    }
  }
}

TEST_CASE("f16 rounding: ties to even and overflow and subnormals", "[half]") {
  REQUIRE(float_to_f16(1.0f) == 0x3c00);
  REQUIRE(float_to_f16(-2.0f) == 0xc000);
  REQUIRE(float_to_f16(65504.0f) == 0x7bff);
  REQUIRE(float_to_f16(65519.99f) == 0x7bff);
  REQUIRE(float_to_f16(65520.0f) == 0x7c00);  // tie rounds to even -> Inf
  REQUIRE(float_to_f16(std::numeric_limits<float>::infinity()) == 0x7c00);
  REQUIRE(float_to_f16(-std::numeric_limits<float>::infinity()) == 0xfc00);
  REQUIRE(float_to_f16(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  REQUIRE(float_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // exact tie to even: zero
  REQUIRE(float_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  REQUIRE(float_to_f16(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 ulp ties to even (2)
  REQUIRE(float_to_f16(-0.0f) == 0x8000);
  // 1 + 2^-11 is halfway between 1 and the next half: ties to even keeps 1.
  REQUIRE(float_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  REQUIRE(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  REQUIRE(std::isnan(f16_to_float(float_to_f16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("bf16 rounding: ties to even and overflow to Inf and NaN stays NaN", "[half]") {
  REQUIRE(float_to_bf16(1.0f) == 0x3f80);
  REQUIRE(float_to_bf16(bits_to_float(0x3f808000u)) == 0x3f80);  // tie, even stays
  REQUIRE(float_to_bf16(bits_to_float(0x3f818000u)) == 0x3f82);  // tie, odd rounds up
  REQUIRE(float_to_bf16(bits_to_float(0x3f808001u)) == 0x3f81);
  REQUIRE(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
  REQUIRE(float_to_bf16(bits_to_float(0x7f800001u)) != 0x7f80);  // signalling NaN stays NaN
  REQUIRE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7f800001u)))));
}

TEST_CASE("f16 narrowing never moves more than half an ulp", "[half]") {
  std::mt19937 generator(7);
  std::uniform_real_distribution<float> exponent(-26.0f, 15.99f);
  for (int i = 0; i < 200000; ++i) {
    const float value = std::exp2(exponent(generator)) * (generator() & 1 ? 1.0f : -1.0f);
    const float rounded = f16_to_float(float_to_f16(value));
    const float next = std::fabs(rounded) < 6.1035156e-05f ? 5.9604645e-08f : std::fabs(rounded) * std::ldexp(1.0f, -10);
    REQUIRE(std::fabs(rounded - value) <= 0.5f * next * 1.0000001f + 1e-12f);
  }
}
