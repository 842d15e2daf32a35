#include <catch2/catch.hpp>
#include <cstdint>
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

TEST_CASE("float conversion helpers agree with the scalar routines", "[tensor]") {
  const std::vector<float> values = {0.0f, -1.5f, 3.14159f, 65504.0f, 1e-6f, -7e-8f};
  std::vector<std::uint16_t> half(values.size()), bf16(values.size());
  convert_from_f32(values.data(), DType::F16, half.data(), values.size());
  convert_from_f32(values.data(), DType::BF16, bf16.data(), values.size());
  std::vector<float> back(values.size());
  convert_to_f32(half.data(), DType::F16, back.data(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    REQUIRE(half[i] == float_to_f16(values[i]));
    REQUIRE(bf16[i] == float_to_bf16(values[i]));
    REQUIRE(back[i] == f16_to_float(half[i]));
  }
  REQUIRE_THROWS_AS(convert_to_f32(half.data(), DType::I32, back.data(), 1), Error);
}
