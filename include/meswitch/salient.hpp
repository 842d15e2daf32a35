// Salient input channels: the few columns of a delta kept in f16.
//
// ME-Switch scores input channel i by the output error its quantization causes on
// calibration activations x:
//
//   score_i = sum_tokens sum_r (x_i D[r,i] - x_i Q(D)[r,i])^2
//           = E[x_i^2] * sum_r (D[r,i] - Q(D)[r,i])^2   (times the token count)
//
// so only the per-channel second moment E[x_i^2] is needed, not the activations
// themselves (1 for every channel without calibration data). Q is the quantizer as
// configured (same bits, groups and clipping search) with no salient channels, so
// a channel is chosen for the error it would really have, and the top-k by score
// are kept in f16.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/quantize.hpp"

namespace meswitch {

// score_i = w_i * sum_r (D[r,i] - deq[r,i])^2 (double, summed over rows in order).
inline std::vector<double> channel_error_scores(const float* delta, std::int64_t rows, std::int64_t cols,
                                                const float* channel_weight, const QuantSpec& spec,
                                                const std::string& tensor) {
  const CompressedDelta quantized = quantize_delta(delta, rows, cols, channel_weight, {}, spec, tensor);
  std::vector<double> scores = column_squared_errors(quantized, delta);
  if (channel_weight != nullptr)
    for (std::int64_t c = 0; c < cols; ++c) scores[std::size_t(c)] *= double(channel_weight[c]);
  return scores;
}

// Indices of the k largest scores (ties: lower index first), sorted ascending.
// k is clamped to [0, scores.size()]; a NaN score is an Error (it cannot be ranked).
inline std::vector<std::int32_t> select_salient_channels(const std::vector<double>& scores, std::int64_t k) {
  const std::int64_t cols = std::int64_t(scores.size());
  k = std::min(std::max<std::int64_t>(k, 0), cols);
  for (std::int64_t i = 0; i < cols; ++i)
    if (std::isnan(scores[std::size_t(i)]))
      throw Error("channel score " + std::to_string(i) + " is NaN; cannot rank salient channels");
  std::vector<std::int32_t> order(static_cast<std::size_t>(cols));
  std::iota(order.begin(), order.end(), 0);
  const auto ranks_before = [&](std::int32_t a, std::int32_t b) {
    const double sa = scores[std::size_t(a)], sb = scores[std::size_t(b)];
    return sa > sb || (sa == sb && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), ranks_before);
  order.resize(static_cast<std::size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

// The channels a salient setting keeps in a matrix of `cols` input channels: `count`
// when given (capped at cols), otherwise `fraction` of cols, fraction in [0, 1] (1 keeps
// every channel), rounded to nearest (ties to even, as Python's round) and at least 1
// when the fraction is > 0. The two are separate so that "1 channel" and "100 %" differ.
inline std::int64_t salient_count(double fraction, std::optional<std::int64_t> count, std::int64_t cols) {
  if (count) {
    if (*count < 0) throw Error("salient channel count must be >= 0, got " + std::to_string(*count));
    return std::min<std::int64_t>(*count, std::max<std::int64_t>(cols, 0));
  }
  if (!std::isfinite(fraction) || fraction < 0.0 || fraction > 1.0)
    throw Error("salient fraction must be a finite number in [0, 1], got " + std::to_string(fraction));
  if (cols <= 0 || fraction == 0.0) return 0;
  const auto rounded = std::int64_t(std::nearbyint(fraction * double(cols)));
  return std::min<std::int64_t>(cols, std::max<std::int64_t>(1, rounded));
}

}  // namespace meswitch
