#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "meswitch/quantize.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;

namespace {

std::vector<float> random_delta(std::int64_t rows, std::int64_t cols, unsigned seed, float outlier_scale = 8.0f) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  std::vector<float> delta(static_cast<std::size_t>(rows * cols));
  for (auto& value : delta) value = normal(generator);
  // Heavy tails, as real deltas have: a few large values per row.
  for (std::int64_t r = 0; r < rows; ++r) delta[std::size_t(r * cols + (r * 7) % cols)] *= outlier_scale;
  return delta;
}

std::vector<float> random_weights(std::int64_t cols, unsigned seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(0.0f, 4.0f);
  std::vector<float> weights(static_cast<std::size_t>(cols));
  for (auto& weight : weights) weight = uniform(generator);
  return weights;
}

std::vector<float> dequantized(const CompressedDelta& q) {
  std::vector<float> out(static_cast<std::size_t>(q.rows * q.cols));
  dequantize_delta(q, out.data());
  return out;
}

}  // namespace

TEST_CASE("quantizer rounding agrees with nearbyint", "[quantize]") {
  for (float x :
       {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 0.49999997f, 3.7f, -3.2f, 4194303.5f, 4194304.5f, 1e9f, -8388609.0f})
    REQUIRE(round_half_even(x) == std::nearbyint(x));
  std::mt19937 generator(3);
  std::uniform_real_distribution<float> uniform(-100.0f, 100.0f);
  for (int i = 0; i < 100000; ++i) {
    const float x = uniform(generator);
    REQUIRE(round_half_even(x) == std::nearbyint(x));
  }
}

TEST_CASE("quantizer clip ratios run from 1 down to min_clip", "[quantize]") {
  QuantSpec spec;
  spec.clip_grid = 5;
  spec.min_clip = 0.6f;
  const std::vector<float> ratios = clip_ratios(spec);
  REQUIRE(ratios.size() == 5);
  REQUIRE(ratios.front() == 1.0f);
  REQUIRE(ratios.back() == Approx(0.6f));
  spec.clip_grid = 1;
  REQUIRE(clip_ratios(spec) == std::vector<float>{1.0f});
}

TEST_CASE("quantized codes are in range and scales are f16 and zeros exact", "[quantize]") {
  const std::int64_t rows = 6, cols = 128;
  const std::vector<float> delta = random_delta(rows, cols, 11);
  for (int bits = 1; bits <= 4; ++bits) {
    for (std::int64_t group : {0, 32, 64, 128}) {
      QuantSpec spec;
      spec.bits = bits;
      spec.group_size = group;
      const CompressedDelta q = quantize_delta(delta.data(), rows, cols, nullptr, {}, spec, "w");
      const std::int64_t groups = group == 0 ? 1 : cols / group;
      REQUIRE(q.group_size == (group == 0 ? cols : group));
      REQUIRE(q.groups() == groups);
      REQUIRE(q.expected_shape(DeltaPiece::scales) == Shape{rows, groups});
      const std::vector<std::uint8_t> codes = unpack_codes(q.qweight, rows, cols, bits);
      for (std::uint8_t code : codes) REQUIRE(int(code) < (1 << bits));
      for (std::size_t g = 0; g < std::size_t(rows * groups); ++g) {
        const float scale = f16_to_float(q.scales[g]);
        REQUIRE(std::isfinite(scale));
        REQUIRE(scale > 0.0f);
        REQUIRE(int(q.zeros[g]) < (1 << bits));
      }
      // Every dequantized value is (code - zero) * scale of its own group.
      const std::vector<float> approx = dequantized(q);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < cols; ++c) {
          const std::size_t g = std::size_t(r * groups + c / q.group_size);
          const float expected =
              (float(codes[std::size_t(r * cols + c)]) - float(q.zeros[g])) * f16_to_float(q.scales[g]);
          REQUIRE(approx[std::size_t(r * cols + c)] == expected);
        }
    }
  }
}

TEST_CASE("exact zeros in a delta get code zero and dequantize to exactly 0", "[quantize]") {
  const std::int64_t rows = 6, cols = 128;
  std::vector<float> delta = random_delta(rows, cols, 12);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = r % 5; c < cols; c += 5) delta[std::size_t(r * cols + c)] = 0.0f;
  for (int bits = 1; bits <= 4; ++bits) {
    QuantSpec spec;  // the clipping search too: a clipped range still holds 0
    spec.clip_grid = 20;
    spec.bits = bits;
    spec.group_size = 32;
    const CompressedDelta q = quantize_delta(delta.data(), rows, cols, nullptr, {}, spec, "w");
    const std::vector<std::uint8_t> codes = unpack_codes(q.qweight, rows, cols, bits);
    const std::vector<float> approx = dequantized(q);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = r % 5; c < cols; c += 5) {
        INFO("bits " << bits << " at (" << r << ", " << c << ")");
        REQUIRE(codes[std::size_t(r * cols + c)] == q.zeros[std::size_t(r * 4 + c / 32)]);
        REQUIRE(approx[std::size_t(r * cols + c)] == 0.0f);
      }
  }
}

TEST_CASE("round to nearest gives the hand-computed scales, zeros and codes", "[quantize]") {
  // One group per row, clip_grid 1 (no clipping). scale = f16((hi - lo) / (2^bits - 1)),
  // zero = rint(-lo / scale), code = rint(v / scale) + zero, with lo = min(v, 0), hi = max(v, 0).
  struct Example {
    int bits;
    std::vector<float> row;
    std::uint16_t scale_bits;
    std::uint8_t zero;
    std::vector<std::uint8_t> codes;
    std::vector<float> values;
  };
  const float step = 0.300048828125f;  // f16 0x34cd, the f16 nearest 0.9 / 3
  const std::vector<Example> examples = {
      // [-0.3, 0.6] in 3 steps: zero = rint(0.3 / 0.30005) = 1.
      {2, {-0.3f, 0.0f, 0.3f, 0.6f}, 0x34cd, 1, {0, 1, 2, 3}, {-step, 0.0f, step, 2 * step}},
      // [-1.5, 0] in 3 steps of 0.5: zero 3; -0.75 / 0.5 = -1.5 rounds half to even, to -2.
      {2, {-1.5f, -0.75f, 0.0f, -0.1f}, 0x3800, 3, {0, 1, 3, 3}, {-1.5f, -1.0f, 0.0f, 0.0f}},
      // 1 bit over [-1, 2]: one step of 3, zero rint(1/3) = 0; -1 clamps up to code 0.
      {1, {-1.0f, 0.25f, 2.0f, 1.4f}, 0x4200, 0, {0, 0, 1, 0}, {0.0f, 0.0f, 3.0f, 0.0f}},
      // 4 bits over [0, 1.875] in 15 steps of 0.125: every value is on the grid.
      {4, {0.0f, 0.125f, 1.0f, 1.875f}, 0x3000, 0, {0, 1, 8, 15}, {0.0f, 0.125f, 1.0f, 1.875f}},
      // 3 bits over [-0.7, 0]: 7 steps of f16(0.1) = 0.0999755859375, zero rint(7.0017) = 7.
      {3, {-0.7f, -0.35f, -0.05f, 0.0f}, 0x2e66, 7, {0, 3, 6, 7},
       {-7 * 0.0999755859375f, -4 * 0.0999755859375f, -0.0999755859375f, 0.0f}},
  };
  for (const Example& example : examples) {
    INFO("bits " << example.bits);
    QuantSpec spec;
    spec.bits = example.bits;
    spec.group_size = 0;
    spec.clip_grid = 1;
    const CompressedDelta q = quantize_delta(example.row.data(), 1, 4, nullptr, {}, spec, "w");
    REQUIRE(q.scales[0] == example.scale_bits);
    REQUIRE(q.zeros[0] == example.zero);
    REQUIRE(unpack_codes(q.qweight, 1, 4, example.bits) == example.codes);
    REQUIRE(dequantized(q) == example.values);
  }
}

TEST_CASE("round to nearest keeps every low-bit value within half a step", "[quantize]") {
  // Without clipping each non-salient value lies in its group's [lo, hi], so it is at most
  // half a step from its level; the f16 rounding of the scale (2^-11 relative) can pull
  // the top level in by up to levels * 2^-11 steps, where the code clamps.
  const std::int64_t rows = 7, cols = 192;
  const std::vector<float> delta = random_delta(rows, cols, 17);
  const std::vector<std::int32_t> salient = {5, 100};
  for (int bits = 1; bits <= 4; ++bits) {
    QuantSpec spec;
    spec.bits = bits;
    spec.group_size = 64;
    spec.clip_grid = 1;
    const CompressedDelta q = quantize_delta(delta.data(), rows, cols, nullptr, salient, spec, "w");
    const std::vector<float> approx = dequantized(q);
    const double levels = double((1 << bits) - 1);
    double error = 0, energy = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) {
        if (c == 5 || c == 100) continue;
        const std::size_t at = std::size_t(r * cols + c);
        const double scale = f16_to_float(q.scales[std::size_t(r * 3 + c / 64)]);
        INFO("bits " << bits << " at (" << r << ", " << c << ") value " << delta[at] << " got " << approx[at]);
        REQUIRE(std::fabs(double(delta[at]) - double(approx[at])) <= scale * (0.5 + levels * 0x1p-11) * (1 + 1e-6));
        error += (double(delta[at]) - approx[at]) * (double(delta[at]) - approx[at]);
        energy += double(delta[at]) * delta[at];
      }
    // And the error as a whole is that of a real quantizer, below the delta's own energy
    // (what an all-zero low-bit part leaves): measured 0.83, 0.27, 0.056 and 0.012 of
    // it at 1-4 bits on this heavy-tailed delta (1 bit has one level besides 0 per
    // group); bounds about 1.1 times that at 1 bit, 1.3-1.5 times above.
    const double bound[] = {0, 0.92, 0.35, 0.08, 0.018};
    INFO("bits " << bits << " relative squared error " << error / energy);
    REQUIRE(error / energy < bound[bits]);
  }
}

TEST_CASE("an all-zero delta dequantizes to exactly zero", "[quantize]") {
  const std::vector<float> delta(4 * 64, 0.0f);
  QuantSpec spec;
  const CompressedDelta q = quantize_delta(delta.data(), 4, 64, nullptr, {}, spec, "w");
  for (std::int64_t g = 0; g < 4 * q.groups(); ++g) REQUIRE(q.scales[g] == 0x3c00);  // hi == lo: scale 1
  for (float value : dequantized(q)) REQUIRE(value == 0.0f);
}

TEST_CASE("quantized salient columns hold code zero and dequantize to their f16 value", "[quantize]") {
  const std::int64_t rows = 5, cols = 96;
  const std::vector<float> delta = random_delta(rows, cols, 5);
  const std::vector<float> weights = random_weights(cols, 6);
  const std::vector<std::int32_t> salient = {90, 3, 47};  // any order; stored ascending
  QuantSpec spec;
  spec.bits = 2;
  spec.group_size = 32;
  const CompressedDelta q = quantize_delta(delta.data(), rows, cols, weights.data(), salient, spec, "w");
  REQUIRE(std::vector<std::int32_t>(q.salient_idx, q.salient_idx + q.k) == std::vector<std::int32_t>{3, 47, 90});
  const std::vector<std::uint8_t> codes = unpack_codes(q.qweight, rows, cols, 2);
  const std::vector<float> approx = dequantized(q);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < q.k; ++i) {
      const std::int32_t c = q.salient_idx[i];
      REQUIRE(codes[std::size_t(r * cols + c)] == q.zeros[std::size_t(r * 3 + c / 32)]);
      const float stored = f16_to_float(float_to_f16(delta[std::size_t(r * cols + c)]));
      REQUIRE(q.salient[std::size_t(r) * 3 + i] == float_to_f16(delta[std::size_t(r * cols + c)]));
      REQUIRE(approx[std::size_t(r * cols + c)] == stored);
    }
}

TEST_CASE("salient columns do not influence the range of their group", "[quantize]") {
  std::vector<float> delta = random_delta(2, 32, 9, 1.0f);
  std::vector<float> spiked = delta;
  spiked[5] = 100.0f;  // huge outlier in a salient column
  QuantSpec spec;
  spec.group_size = 32;
  const CompressedDelta plain = quantize_delta(delta.data(), 2, 32, nullptr, {5}, spec, "w");
  const CompressedDelta with_spike = quantize_delta(spiked.data(), 2, 32, nullptr, {5}, spec, "w");
  REQUIRE(std::equal(plain.scales, plain.scales + 2, with_spike.scales));
  REQUIRE(std::equal(plain.zeros, plain.zeros + 2, with_spike.zeros));
  REQUIRE(std::equal(plain.qweight, plain.qweight + 2 * plain.words_per_row(), with_spike.qweight));
}

TEST_CASE("the quantizer clipping search never does worse than round to nearest", "[quantize]") {
  const std::int64_t rows = 8, cols = 256;
  const std::vector<float> delta = random_delta(rows, cols, 21, 20.0f);
  const std::vector<float> weights = random_weights(cols, 22);
  for (int bits = 1; bits <= 4; ++bits) {
    for (const float* weight : {static_cast<const float*>(nullptr), weights.data()}) {
      QuantSpec searched;
      searched.bits = bits;
      searched.group_size = 64;
      searched.clip_grid = 20;
      QuantSpec rtn = searched;
      rtn.clip_grid = 1;
      const CompressedDelta a = quantize_delta(delta.data(), rows, cols, weight, {}, searched, "w");
      const CompressedDelta b = quantize_delta(delta.data(), rows, cols, weight, {}, rtn, "w");
      const double error_searched = weighted_squared_error(delta.data(), dequantized(a).data(), rows, cols, weight);
      const double error_rtn = weighted_squared_error(delta.data(), dequantized(b).data(), rows, cols, weight);
      REQUIRE(error_searched <= error_rtn);
      if (bits <= 2) REQUIRE(error_searched < error_rtn);  // heavy tails: clipping must pay off at low bits
    }
  }
}

TEST_CASE("quantization error falls with more bits", "[quantize]") {
  const std::vector<float> delta = random_delta(4, 128, 31);
  double previous = std::numeric_limits<double>::infinity();
  for (int bits = 1; bits <= 4; ++bits) {
    QuantSpec spec;
    spec.bits = bits;
    const CompressedDelta q = quantize_delta(delta.data(), 4, 128, nullptr, {}, spec, "w");
    const double error = weighted_squared_error(delta.data(), dequantized(q).data(), 4, 128, nullptr);
    REQUIRE(error < previous);
    previous = error;
  }
}

TEST_CASE("quantization error weights each input channel", "[quantize]") {
  const std::vector<float> delta = {1, 2, 3, 4};
  const std::vector<float> approx = {0, 2, 1, 4};
  const std::vector<float> weights = {2, 10, 0.5f, 7};
  REQUIRE(weighted_squared_error(delta.data(), approx.data(), 2, 2, nullptr) == 5.0);
  REQUIRE(weighted_squared_error(delta.data(), approx.data(), 2, 2, weights.data()) == 2.0 * 1 + 2.0 * 4);
}

TEST_CASE("bad quantization settings name the tensor", "[quantize]") {
  const std::vector<float> delta(2 * 96, 0.01f);
  QuantSpec spec;
  spec.bits = 0;
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("bits"));
  spec.bits = 5;
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("5"));
  spec.bits = 2;
  spec.group_size = 64;
  REQUIRE_NOTHROW(quantize_delta(delta.data(), 2, 96, nullptr, {}, spec, "mlp.up"));  // ragged by default
  spec.ragged_groups = false;
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("64") && Contains("96"));
  spec.ragged_groups = true;
  spec.group_size = -32;
  REQUIRE_THROWS_AS(validate_spec(spec, 96, "mlp.up"), Error);
  spec.group_size = 32;
  spec.min_clip = 0.0f;
  REQUIRE_THROWS_WITH(validate_spec(spec, 96, "mlp.up"), Contains("mlp.up") && Contains("min_clip"));
  spec.min_clip = 0.5f;
  spec.clip_grid = 0;
  REQUIRE_THROWS_WITH(validate_spec(spec, 96, "mlp.up"), Contains("mlp.up") && Contains("clip_grid"));
  spec.clip_grid = 20;
  REQUIRE_NOTHROW(validate_spec(spec, 96, "mlp.up"));
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {96}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("96") && Contains("out of range"));
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {-1}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("out of range"));
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 2, 96, nullptr, {4, 4}, spec, "mlp.up"),
                      Contains("mlp.up") && Contains("repeated"));
}

TEST_CASE("bad delta values and channel weights are format errors with their position", "[quantize]") {
  QuantSpec spec;
  spec.group_size = 32;
  std::vector<float> delta(3 * 32, 0.01f);
  delta[2 * 32 + 17] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(quantize_delta(delta.data(), 3, 32, nullptr, {}, spec, "attn.o"), FormatError);
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 3, 32, nullptr, {}, spec, "attn.o"),
                      Contains("attn.o") && Contains("(2, 17)"));
  delta[2 * 32 + 17] = 0.0f;
  delta[1 * 32 + 4] = -std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 3, 32, nullptr, {}, spec, "attn.o"),
                      Contains("attn.o") && Contains("(1, 4)"));
  delta[1 * 32 + 4] = 0.0f;
  std::vector<float> weights(32, 1.0f);
  weights[9] = -1.0f;
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 3, 32, weights.data(), {}, spec, "attn.o"),
                      Contains("attn.o") && Contains("channel 9"));
  weights[9] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(quantize_delta(delta.data(), 3, 32, weights.data(), {}, spec, "attn.o"), FormatError);
  // A salient value beyond f16 cannot be stored.
  delta[0] = 1e6f;
  REQUIRE_THROWS_WITH(quantize_delta(delta.data(), 3, 32, nullptr, {0}, spec, "attn.o"),
                      Contains("attn.o") && Contains("f16"));
}

TEST_CASE("the quantizer's output passes the delta's validation and owns its arrays", "[quantize]") {
  const std::vector<float> delta = random_delta(3, 688, 1);
  QuantSpec spec;  // the defaults: 2 bits, groups of 64, ragged last group
  CompressedDelta q = quantize_delta(delta.data(), 3, 688, nullptr, {600, 3}, spec, "w");
  REQUIRE(q.groups() == 11);  // ten groups of 64 and one of 48
  REQUIRE(q.owner != nullptr);
  REQUIRE_NOTHROW(q.validate());
  const std::vector<float> before = dequantized(q);
  const CompressedDelta copy = q;  // shares the arrays through the owner
  q = CompressedDelta{};
  REQUIRE(dequantized(copy) == before);
}
