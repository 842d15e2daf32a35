#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "meswitch/dlpack.hpp"
#include "meswitch/tensor.hpp"

using namespace meswitch;

TEST_CASE("dtype names and sizes and parsing round trip", "[tensor]") {
  for (DType dtype : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::U8, DType::U32}) {
    DType parsed;
    REQUIRE(parse_dtype(dtype_name(dtype), parsed));
    REQUIRE(parsed == dtype);
    REQUIRE(from_dlpack_dtype(to_dlpack_dtype(dtype)) == dtype);
  }
  DType unused;
  REQUIRE_FALSE(parse_dtype("F64", unused));
  REQUIRE_FALSE(parse_dtype("f32", unused));
  REQUIRE(dtype_size(DType::BF16) == 2);
  REQUIRE(dtype_size(DType::U32) == 4);
  REQUIRE(dtype_size(DType::U8) == 1);
}

TEST_CASE("TensorView strides and contiguity and byte counts", "[tensor]") {
  std::vector<float> storage(24);
  TensorView view(storage.data(), DType::F32, {2, 3, 4});
  REQUIRE(view.strides == Shape{12, 4, 1});
  REQUIRE(view.numel() == 24);
  REQUIRE(view.nbytes() == 96);
  REQUIRE(view.is_contiguous());
  TensorView transposed(storage.data(), DType::F32, {4, 6}, {1, 4});
  REQUIRE_FALSE(transposed.is_contiguous());
  REQUIRE_THROWS_AS(TensorView(storage.data(), DType::F32, {4, 6}, {1}), Error);
  REQUIRE(shape_string({2, 3}) == "[2, 3]");
}

TEST_CASE("float conversion helpers give the known f16 and bf16 bit patterns", "[tensor]") {
  // Expected bits worked out by hand from IEEE 754 binary16 (1-5-10) and bfloat16
  // (1-8-7), round to nearest even:
  //   -1.5       = -1.1b * 2^0        f16 1 01111 1000000000 = 0xbe00, bf16 0xbfc0
  //   3.14159    f16 3.140625 (0x4248); f32 0x40490fd0 keeps its top half in bf16: 0x4049
  //   65504      largest f16 (0x7bff); bf16 rounds f32 0x477fe000 up to 0x4780 = 65536
  //   1e-6       f16 subnormal 17 * 2^-24 (0x0011); bf16 0x3586 (f32 0x358637bd rounded down)
  //   -7e-8      f16 -1 * 2^-24 (0x8001); bf16 0xb396
  //   1 + 2^-11  halfway between two f16 values: even keeps 1.0 (0x3c00); bf16 1.0
  //   1 + 3*2^-11  halfway: rounds up to the even 1 + 2^-9 (0x3c02); bf16 1.0
  //   65520      halfway between 65504 and 2^16: to even, which is f16 +Inf (0x7c00)
  const std::vector<float> values = {0.0f,   -1.5f, 3.14159f, 65504.0f, 1e-6f, -7e-8f, 1.0f + 0x1p-11f,
                                     1.0f + 0x3p-11f, 65520.0f, -std::numeric_limits<float>::infinity()};
  const std::vector<std::uint16_t> f16_bits = {0x0000, 0xbe00, 0x4248, 0x7bff, 0x0011,
                                               0x8001, 0x3c00, 0x3c02, 0x7c00, 0xfc00};
  const std::vector<std::uint16_t> bf16_bits = {0x0000, 0xbfc0, 0x4049, 0x4780, 0x3586,
                                                0xb396, 0x3f80, 0x3f80, 0x4780, 0xff80};
  // What those bit patterns widen to, exactly.
  const std::vector<float> f16_values = {0.0f,      -1.5f,      3.140625f, 65504.0f,
                                         17 * 0x1p-24f, -0x1p-24f, 1.0f,      1.0f + 0x1p-9f,
                                         std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  const std::vector<float> bf16_values = {0.0f, -1.5f, 3.140625f, 65536.0f, 0x1.0cp-20f, -0x1.2cp-24f, 1.0f, 1.0f,
                                          65536.0f, -std::numeric_limits<float>::infinity()};
  std::vector<std::uint16_t> half(values.size()), bf16(values.size());
  convert_from_f32(values.data(), DType::F16, half.data(), values.size());
  convert_from_f32(values.data(), DType::BF16, bf16.data(), values.size());
  REQUIRE(half == f16_bits);
  REQUIRE(bf16 == bf16_bits);
  std::vector<float> back(values.size());
  convert_to_f32(f16_bits.data(), DType::F16, back.data(), values.size());
  REQUIRE(back == f16_values);
  convert_to_f32(bf16_bits.data(), DType::BF16, back.data(), values.size());
  REQUIRE(back == bf16_values);
  // F32 to F32 is a plain copy, bit for bit (a NaN payload included).
  const std::vector<float> with_nan = {1.25f, std::numeric_limits<float>::quiet_NaN(), -0.0f};
  std::vector<float> copied(with_nan.size(), 7.0f);
  convert_from_f32(with_nan.data(), DType::F32, copied.data(), copied.size());
  REQUIRE(std::memcmp(copied.data(), with_nan.data(), sizeof(float) * copied.size()) == 0);
  std::fill(copied.begin(), copied.end(), 7.0f);
  convert_to_f32(with_nan.data(), DType::F32, copied.data(), copied.size());
  REQUIRE(std::memcmp(copied.data(), with_nan.data(), sizeof(float) * copied.size()) == 0);
  REQUIRE_THROWS_AS(convert_to_f32(half.data(), DType::I32, back.data(), 1), Error);
  REQUIRE_THROWS_AS(convert_from_f32(values.data(), DType::U8, half.data(), 1), Error);
}
