#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "meswitch/salient.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;

namespace {

std::vector<float> noisy_delta(std::int64_t rows, std::int64_t cols, unsigned seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  std::vector<float> delta(static_cast<std::size_t>(rows * cols));
  for (auto& value : delta) value = normal(generator);
  return delta;
}

}  // namespace

TEST_CASE("channel scores are the weighted per-column quantization error", "[salient]") {
  const std::int64_t rows = 6, cols = 64;
  const std::vector<float> delta = noisy_delta(rows, cols, 4);
  std::vector<float> weights(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) weights[std::size_t(c)] = 0.25f * float(c % 5);
  QuantSpec spec;
  spec.bits = 2;
  spec.group_size = 32;
  const std::vector<double> scores = channel_error_scores(delta.data(), rows, cols, weights.data(), spec, "w");
  REQUIRE(std::int64_t(scores.size()) == cols);

  const CompressedDelta q = quantize_delta(delta.data(), rows, cols, weights.data(), {}, spec, "w");
  std::vector<float> approx(static_cast<std::size_t>(rows * cols));
  dequantize_delta(q, approx.data());
  double total = 0.0;
  for (std::int64_t c = 0; c < cols; ++c) {
    double column = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) {
      const double difference = double(delta[std::size_t(r * cols + c)]) - double(approx[std::size_t(r * cols + c)]);
      column += difference * difference;
    }
    REQUIRE(scores[std::size_t(c)] == Approx(double(weights[std::size_t(c)]) * column).epsilon(1e-12));
    if (c % 5 == 0) REQUIRE(scores[std::size_t(c)] == 0.0);
    total += scores[std::size_t(c)];
  }
  REQUIRE(total == Approx(weighted_squared_error(delta.data(), approx.data(), rows, cols, weights.data())));
}

TEST_CASE("a salient channel between grid points scores highest and keeping it lowers the error", "[salient]") {
  // Round to nearest, 2 bits, range [-0.3, 0.6]: scale 0.3 and zero 1 put the grid at
  // -0.3, 0, 0.3, 0.6. Channel 13 sits halfway between two levels in every row.
  const std::int64_t rows = 4, cols = 32;
  std::vector<float> delta(static_cast<std::size_t>(rows * cols), 0.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = delta.data() + r * cols;
    row[0] = -0.3f;
    row[1] = 0.6f;
    for (std::int64_t c = 2; c < cols; c += 3) row[c] = 0.3f;
    row[13] = 0.45f;
  }
  QuantSpec spec;
  spec.group_size = 0;
  spec.clip_grid = 1;
  const std::vector<double> scores = channel_error_scores(delta.data(), rows, cols, nullptr, spec, "w");
  const std::vector<std::int32_t> top = select_salient_channels(scores, 1);
  REQUIRE(top == std::vector<std::int32_t>{13});
  REQUIRE(scores[13] == Approx(rows * 0.15 * 0.15).epsilon(1e-2));

  const CompressedDelta without = quantize_delta(delta.data(), rows, cols, nullptr, {}, spec, "w");
  const CompressedDelta with = quantize_delta(delta.data(), rows, cols, nullptr, top, spec, "w");
  std::vector<float> a(static_cast<std::size_t>(rows * cols)), b(static_cast<std::size_t>(rows * cols));
  dequantize_delta(without, a.data());
  dequantize_delta(with, b.data());
  REQUIRE(weighted_squared_error(delta.data(), b.data(), rows, cols, nullptr) <
          0.01 * weighted_squared_error(delta.data(), a.data(), rows, cols, nullptr));
}

TEST_CASE("keeping the top-scored salient channels never raises the error", "[salient]") {
  const std::int64_t rows = 8, cols = 128;
  const std::vector<float> delta = noisy_delta(rows, cols, 8);
  std::vector<float> weights(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) weights[std::size_t(c)] = 1.0f + float(c % 7);
  QuantSpec spec;
  spec.group_size = 32;
  const std::vector<double> scores = channel_error_scores(delta.data(), rows, cols, weights.data(), spec, "w");
  double previous = std::numeric_limits<double>::infinity();
  for (std::int64_t k : {0, 1, 4, 16}) {
    const CompressedDelta q =
        quantize_delta(delta.data(), rows, cols, weights.data(), select_salient_channels(scores, k), spec, "w");
    std::vector<float> approx(static_cast<std::size_t>(rows * cols));
    dequantize_delta(q, approx.data());
    const double error = weighted_squared_error(delta.data(), approx.data(), rows, cols, weights.data());
    REQUIRE(error < previous);
    previous = error;
  }
}

TEST_CASE("salient top-k selection ranks by score with ties to the lower index", "[salient]") {
  const std::vector<double> scores = {0.5, 3.0, 1.0, 3.0, 0.0, 2.0, 3.0};
  REQUIRE(select_salient_channels(scores, 0).empty());
  REQUIRE(select_salient_channels(scores, 1) == std::vector<std::int32_t>{1});
  REQUIRE(select_salient_channels(scores, 2) == std::vector<std::int32_t>{1, 3});
  REQUIRE(select_salient_channels(scores, 4) == std::vector<std::int32_t>{1, 3, 5, 6});
  REQUIRE(select_salient_channels(scores, 100).size() == scores.size());
  REQUIRE(select_salient_channels(scores, -3).empty());
  const std::vector<double> bad = {1.0, std::numeric_limits<double>::quiet_NaN()};
  REQUIRE_THROWS_AS(select_salient_channels(bad, 1), Error);
}

TEST_CASE("salient_count reads a fraction or an absolute count", "[salient]") {
  REQUIRE(salient_count(0.0, std::nullopt, 4096) == 0);
  REQUIRE(salient_count(0.01, std::nullopt, 4096) == 41);
  REQUIRE(salient_count(0.0001, std::nullopt, 100) == 1);  // a positive fraction keeps at least one channel
  REQUIRE(salient_count(1.0, std::nullopt, 4096) == 4096);  // 100 % is every channel, not one
  REQUIRE(salient_count(0.5, std::nullopt, 5) == 2);        // 2.5 rounds to even
  REQUIRE(salient_count(0.0, 8, 4096) == 8);
  REQUIRE(salient_count(0.0, 1, 4096) == 1);
  REQUIRE(salient_count(0.5, 0, 4096) == 0);  // a count, when given, decides
  REQUIRE(salient_count(0.0, 5000, 4096) == 4096);
  REQUIRE_THROWS_AS(salient_count(-0.1, std::nullopt, 10), Error);
  REQUIRE_THROWS_AS(salient_count(1.5, std::nullopt, 10), Error);
  REQUIRE_THROWS_AS(salient_count(std::numeric_limits<double>::infinity(), std::nullopt, 10), Error);
  REQUIRE_THROWS_AS(salient_count(std::numeric_limits<double>::quiet_NaN(), std::nullopt, 10), Error);
  REQUIRE_THROWS_AS(salient_count(0.0, -1, 10), Error);
}

TEST_CASE("salient channel scores pass on bad settings with the tensor name", "[salient]") {
  const std::vector<float> delta = noisy_delta(2, 48, 1);
  QuantSpec spec;
  spec.group_size = 32;
  spec.ragged_groups = false;
  REQUIRE_THROWS_WITH(channel_error_scores(delta.data(), 2, 48, nullptr, spec, "mlp.down"),
                      Contains("mlp.down") && Contains("32") && Contains("48"));
}
