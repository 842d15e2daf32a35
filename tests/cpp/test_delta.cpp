#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "meswitch/delta.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;

TEST_CASE("delta of same-shaped tensors is expert minus base in f32", "[delta]") {
  std::vector<float> base = {1, 2, 3, 4, 5, 6};
  std::vector<float> expert = {1.5f, 2, 2, 4, 5.25f, 7};
  const DeltaTensor d =
      compute_delta(TensorView(base.data(), DType::F32, {2, 3}), TensorView(expert.data(), DType::F32, {2, 3}), "w");
  REQUIRE(d.rows == 2);
  REQUIRE(d.cols == 3);
  REQUIRE(d.delta == std::vector<float>{0.5f, 0, -1, 0, 0.25f, 1});
  REQUIRE(d.extra_rows == 0);
  REQUIRE(d.extra.empty());
}

TEST_CASE("delta mixes floating dtypes and treats 1-D tensors as one row", "[delta]") {
  std::vector<std::uint16_t> base = {float_to_bf16(1.0f), float_to_bf16(-2.0f), float_to_bf16(0.5f)};
  std::vector<std::uint16_t> expert = {float_to_f16(1.25f), float_to_f16(-2.0f), float_to_f16(0.0f)};
  const DeltaTensor d =
      compute_delta(TensorView(base.data(), DType::BF16, {3}), TensorView(expert.data(), DType::F16, {3}), "norm");
  REQUIRE(d.rows == 1);
  REQUIRE(d.cols == 3);
  REQUIRE(d.delta == std::vector<float>{0.25f, 0.0f, -0.5f});
}

TEST_CASE("delta of an expanded vocabulary returns its extra rows whole", "[delta]") {
  std::vector<float> base = {1, 1, 2, 2};
  std::vector<float> expert = {1, 2, 2, 3, 7, 8, 9, 10};
  const DeltaTensor d = compute_delta(TensorView(base.data(), DType::F32, {2, 2}),
                                      TensorView(expert.data(), DType::F32, {4, 2}), "embed_tokens");
  REQUIRE(d.rows == 2);
  REQUIRE(d.delta == std::vector<float>{0, 1, 0, 1});
  REQUIRE(d.extra_rows == 2);
  REQUIRE(d.extra == std::vector<float>{7, 8, 9, 10});
}

TEST_CASE("delta rejects mismatched or non-floating tensors naming the tensor", "[delta]") {
  std::vector<float> a(12, 1.0f), b(12, 1.0f);
  std::vector<std::int32_t> ints(12, 1);
  REQUIRE_THROWS_WITH(
      compute_delta(TensorView(a.data(), DType::F32, {3, 4}), TensorView(b.data(), DType::F32, {12}), "q_proj"),
      Contains("q_proj") && Contains("rank") && Contains("[3, 4]") && Contains("[12]"));
  REQUIRE_THROWS_WITH(
      compute_delta(TensorView(a.data(), DType::F32, {4, 3}), TensorView(b.data(), DType::F32, {3, 4}), "q_proj"),
      Contains("q_proj") && Contains("[4, 3]") && Contains("[3, 4]"));
  REQUIRE_THROWS_WITH(
      compute_delta(TensorView(a.data(), DType::F32, {12}), TensorView(b.data(), DType::F32, {6}), "q_proj"),
      Contains("q_proj"));
  REQUIRE_THROWS_WITH(
      compute_delta(TensorView(a.data(), DType::F32, {4, 3}), TensorView(b.data(), DType::F32, {2, 3}), "lm_head"),
      Contains("lm_head") && Contains("fewer rows"));
  REQUIRE_THROWS_WITH(
      compute_delta(TensorView(a.data(), DType::F32, {3, 4}), TensorView(ints.data(), DType::I32, {3, 4}), "q_proj"),
      Contains("q_proj") && Contains("I32") && Contains("floating"));
  REQUIRE_THROWS_AS(compute_delta(TensorView(a.data(), DType::F32, {3, 4}),
                                  TensorView(b.data(), DType::F32, {3, 4}, {1, 3}), "q_proj"),
                    FormatError);
}

TEST_CASE("delta rejects NaN and Inf in base or expert with their position", "[delta]") {
  std::vector<float> base(12, 1.0f), expert(12, 1.0f);
  expert[7] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(compute_delta(TensorView(base.data(), DType::F32, {3, 4}),
                                  TensorView(expert.data(), DType::F32, {3, 4}), "v_proj"),
                    FormatError);
  REQUIRE_THROWS_WITH(compute_delta(TensorView(base.data(), DType::F32, {3, 4}),
                                    TensorView(expert.data(), DType::F32, {3, 4}), "v_proj"),
                      Contains("v_proj") && Contains("expert") && Contains("(1, 3)"));
  expert[7] = 1.0f;
  std::vector<std::uint16_t> half_base(12, float_to_f16(1.0f));
  half_base[10] = 0x7c00;  // +Inf
  REQUIRE_THROWS_WITH(compute_delta(TensorView(half_base.data(), DType::F16, {3, 4}),
                                    TensorView(expert.data(), DType::F32, {3, 4}), "v_proj"),
                      Contains("v_proj") && Contains("base") && Contains("(2, 2)"));
}
