// A random compressed delta in the canonical layout, for the tests of the CUDA layout
// and kernels (host and device).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/half.hpp"
#include "meswitch/pack.hpp"

namespace meswitch_test {

struct CanonicalDelta {
  std::int64_t rows = 0, cols = 0, group = 0, k = 0;
  int bits = 0;
  std::vector<std::uint8_t> codes;  // [rows, cols]
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint16_t> scales, salient;
  std::vector<std::uint8_t> zeros;
  std::vector<std::int32_t> salient_idx;

  std::int64_t groups() const { return (cols + group - 1) / group; }
  meswitch::CompressedDelta view(const std::string& name = "layer.w") const {
    meswitch::CompressedDelta d;
    d.name = name;
    d.rows = rows;
    d.cols = cols;
    d.bits = bits;
    d.group_size = group;
    d.k = k;
    d.qweight = qweight.data();
    d.scales = scales.data();
    d.zeros = zeros.data();
    d.salient_idx = salient_idx.data();
    d.salient = salient.data();
    return d;
  }
};

// Random codes, scales, zero points and salient columns in the canonical layout; salient
// columns carry code = zero point, as the writer stores them.
CanonicalDelta random_delta(std::int64_t rows, std::int64_t cols, int bits, std::int64_t group, std::int64_t k,
                            unsigned seed) {
  std::mt19937 rng(seed);
  CanonicalDelta d;
  d.rows = rows;
  d.cols = cols;
  d.bits = bits;
  d.group = group;
  d.k = k;
  std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f), value(-0.5f, 0.5f);
  d.codes.resize(std::size_t(rows * cols));
  for (auto& c : d.codes) c = std::uint8_t(code(rng));
  d.scales.resize(std::size_t(rows * d.groups()));
  d.zeros.resize(d.scales.size());
  for (auto& s : d.scales) s = meswitch::float_to_f16(scale(rng));
  for (auto& z : d.zeros) z = std::uint8_t(code(rng));
  std::vector<std::int32_t> channels(static_cast<std::size_t>(cols));
  std::iota(channels.begin(), channels.end(), 0);
  std::shuffle(channels.begin(), channels.end(), rng);
  d.salient_idx.assign(channels.begin(), channels.begin() + k);
  std::sort(d.salient_idx.begin(), d.salient_idx.end());
  d.salient.resize(std::size_t(rows * k));
  for (auto& s : d.salient) s = meswitch::float_to_f16(value(rng));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int32_t c : d.salient_idx) d.codes[std::size_t(r * cols + c)] = d.zeros[std::size_t(r * d.groups() + c / group)];
  d.qweight = meswitch::pack_codes(d.codes.data(), rows, cols, bits);
  return d;
}

}  // namespace meswitch_test
