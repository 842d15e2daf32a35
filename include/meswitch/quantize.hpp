// Asymmetric b-bit group quantization of a delta matrix, with a clipping search.
//
// A delta D [rows, cols] (cols = input channels) is cut along each row into groups
// of `group_size` columns. Each group stores an f16 scale and a u8 zero point:
//
//   code  = clamp(rint(v / scale) + zero, 0, 2^bits - 1)      (u8, packed by pack.hpp)
//   value = (code - zero) * scale
//
// Why these choices:
// - The range always contains 0 (lo <= 0 <= hi), so the zero point is an exact
//   integer code: salient columns and exact zeros dequantize to exactly 0.
// - The scale is rounded to f16 *before* codes are chosen, because the kernels only
//   ever see the stored f16 scale; choosing codes for the f32 scale would optimise
//   a quantizer nobody runs.
// - Low-bit deltas are heavy-tailed, so the full range wastes levels on a few
//   outliers. A grid of clip ratios alpha in [min_clip, 1] shrinks the range and
//   keeps the alpha with the least activation-weighted error sum_j w_j (v_j - q_j)^2
//   (w_j = E[x_j^2] of input channel j; 1 without calibration data). clip_grid = 1
//   is plain round-to-nearest (RTN).
// - Salient columns are kept in f16 beside the low-bit block, so they neither
//   widen the range nor count in the error; in the block they hold code = zero,
//   which keeps the block a dense [rows, cols] matrix in natural column order.
// - Every float operation is float32 in a fixed order (and rint is round half to
//   even) so an independent NumPy float32 implementation reproduces codes, scales
//   and zeros bit for bit (tests/python/test_quantize_reference.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/pack.hpp"

namespace meswitch {

// The single source of the quantization defaults (the Python settings read them from
// the bound values).
struct QuantSpec {
  int bits = 2;
  std::int64_t group_size = 64;  // 0 = whole row
  // Clip ratios searched; 1 = RTN. The search lowers the activation-weighted error yet
  // raises perplexity on the bundled family (docs/results.md), so it is opt-in.
  int clip_grid = 1;
  float min_clip = 0.5f;  // smallest clip ratio of the grid
  // A shorter last group when group_size does not divide the width (a 688-wide matrix
  // in groups of 64: ten groups of 64 and one of 48), so every real width works; false
  // reports such a width instead.
  bool ragged_groups = true;
};

namespace detail {

inline std::string tensor_prefix(const std::string& tensor) { return "tensor '" + tensor + "': "; }

inline std::string position(std::int64_t row, std::int64_t col) {
  return "(" + std::to_string(row) + ", " + std::to_string(col) + ")";
}

}  // namespace detail

// Round half to even, identical to std::nearbyint in the default rounding mode
// (and to np.rint). Adding 1.5 * 2^23 pushes |x| < 2^22 into the binade where the
// float spacing is 1, so the FPU rounds for us; this avoids a libm call per code
// on x86-64 builds without SSE4.1. The sign of a zero result may differ from
// nearbyint's, which no caller can observe (results are added to a zero point).
inline float round_half_even(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  if (std::fabs(x) < 4194304.0f) return (x + kMagic) - kMagic;
  return std::nearbyint(x);
}

// The arrays a quantized delta owns; its CompressedDelta points into them.
struct QuantizedArrays {
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint16_t> scales, salient;  // f16 bits
  std::vector<std::uint8_t> zeros;
  std::vector<std::int32_t> salient_idx;
};

// Checks settings before any work; messages name the tensor and the offending value.
inline void validate_spec(const QuantSpec& spec, std::int64_t cols, const std::string& tensor) {
  const std::string where = detail::tensor_prefix(tensor);
  if (spec.bits < 1 || spec.bits > 4) throw Error(where + "bits must be 1..4, got " + std::to_string(spec.bits));
  if (cols < 1) throw Error(where + "cannot quantize a matrix with " + std::to_string(cols) + " columns");
  if (spec.group_size < 0 || (spec.group_size > 0 && cols % spec.group_size != 0 && !spec.ragged_groups))
    throw Error(where + "group size " + std::to_string(spec.group_size) + " does not divide the width " +
                std::to_string(cols) + " (use a divisor of the width, 0 for whole rows, or allow ragged groups)");
  if (spec.clip_grid < 1) throw Error(where + "clip_grid must be >= 1, got " + std::to_string(spec.clip_grid));
  if (!(spec.min_clip > 0.0f && spec.min_clip <= 1.0f))
    throw Error(where + "min_clip must be in (0, 1], got " + std::to_string(spec.min_clip));
}

inline std::int64_t effective_group_size(const QuantSpec& spec, std::int64_t cols) {
  return spec.group_size == 0 ? cols : std::min(spec.group_size, cols);
}

// alpha_t = 1 - t * (1 - min_clip) / (clip_grid - 1), t = 0 .. clip_grid-1, in float32.
inline std::vector<float> clip_ratios(const QuantSpec& spec) {
  if (spec.clip_grid <= 1) return {1.0f};
  std::vector<float> ratios(static_cast<std::size_t>(spec.clip_grid));
  const float span = 1.0f - spec.min_clip;
  const float steps = float(spec.clip_grid - 1);
  for (int t = 0; t < spec.clip_grid; ++t) ratios[std::size_t(t)] = 1.0f - float(t) * span / steps;
  return ratios;
}

// Scale and zero point of one group for one clip ratio.
struct GroupParams {
  std::uint16_t scale_bits = 0x3c00;  // f16 1.0
  float scale = 1.0f;                 // f16_to_float(scale_bits): the only scale ever used
  std::uint8_t zero = 0;
};

// `lo0 <= 0 <= hi0` is the group's unclipped range. A scale below f16's smallest
// subnormal would round to 0 (and divide by zero); it becomes that subnormal, 2^-24,
// which still represents such a group's values to within 2^-25. Returns false when
// the scale overflows f16 (|delta| beyond ~65504 * levels): no f16 scale can hold it.
inline bool group_params(float lo0, float hi0, float alpha, int levels, GroupParams& params) {
  const float lo = alpha * lo0;
  const float hi = alpha * hi0;
  params = GroupParams{};
  if (hi != lo) {
    std::uint16_t bits = float_to_f16((hi - lo) / float(levels));
    if ((bits & 0x7fffu) == 0x7c00u) return false;
    if (bits == 0) bits = 0x0001;
    params.scale_bits = bits;
    params.scale = f16_to_float(bits);
  }
  const float zero = std::min(std::max(round_half_even(-lo / params.scale), 0.0f), float(levels));
  params.zero = std::uint8_t(zero);
  return true;
}

inline std::uint8_t quantize_value(float value, const GroupParams& params, int levels) {
  const float code = round_half_even(value / params.scale) + float(params.zero);
  return std::uint8_t(std::min(std::max(code, 0.0f), float(levels)));
}

inline float dequantize_value(std::uint8_t code, const GroupParams& params) {
  return (float(code) - float(params.zero)) * params.scale;
}

// sum_j w_j (v_j - q_j)^2 in double, accumulated in index order. The difference is
// taken in double after the f32 dequantization, so a fused multiply-add cannot change
// it; a target that contracts the accumulation (aarch64) can only move exact ties.
inline double group_error(const float* values, const float* weights, std::size_t count, const GroupParams& params,
                          int levels) {
  double error = 0.0;
  for (std::size_t j = 0; j < count; ++j) {
    const float approx = dequantize_value(quantize_value(values[j], params, levels), params);
    const double difference = double(values[j]) - double(approx);
    error += double(weights[j]) * (difference * difference);
  }
  return error;
}

// The group's parameters with the least weighted error over the clip ratios (the first,
// least clipped, minimum wins ties). `lo0 <= 0 <= hi0` is the range of the `count` values.
inline GroupParams best_group_params(const float* values, const float* weights, std::size_t count, float lo0,
                                     float hi0, const std::vector<float>& ratios, int levels,
                                     const std::string& tensor, std::int64_t row, std::int64_t group) {
  GroupParams best, candidate;
  double best_error = std::numeric_limits<double>::infinity();
  for (const float alpha : ratios) {
    if (!group_params(lo0, hi0, alpha, levels, candidate))
      throw FormatError("", tensor,
                        "row " + std::to_string(row) + " group " + std::to_string(group) + " spans [" +
                            std::to_string(lo0) + ", " + std::to_string(hi0) + "], too wide for an f16 scale at " +
                            std::to_string(int(std::log2(levels + 1))) + " bits");
    const double error = ratios.size() == 1 ? 0.0 : group_error(values, weights, count, candidate, levels);
    if (error < best_error) {
      best_error = error;
      best = candidate;
    }
  }
  return best;
}

// Channel weights (E[x^2] per input channel) must be finite and >= 0; null is allowed.
inline void check_channel_weight(const float* channel_weight, std::int64_t cols, const std::string& tensor) {
  if (channel_weight == nullptr) return;
  for (std::int64_t i = 0; i < cols; ++i)
    if (!(std::isfinite(channel_weight[i]) && channel_weight[i] >= 0.0f))
      throw FormatError("", tensor,
                        "channel weight " + std::to_string(channel_weight[i]) + " of input channel " +
                            std::to_string(i) + " is not finite and >= 0");
}

// Checks the salient indices (in range, unique) and that every delta value is finite;
// returns the salient mask [cols].
inline std::vector<std::uint8_t> checked_salient_mask(const float* delta, std::int64_t rows, std::int64_t cols,
                                                      const std::vector<std::int32_t>& salient_idx,
                                                      const std::string& tensor) {
  const std::string where = detail::tensor_prefix(tensor);
  if (rows < 0) throw Error(where + "cannot quantize a matrix with " + std::to_string(rows) + " rows");
  std::vector<std::uint8_t> is_salient(std::size_t(cols), 0);
  for (const std::int32_t index : salient_idx) {
    if (index < 0 || index >= cols)
      throw Error(where + "salient index " + std::to_string(index) + " is out of range [0, " + std::to_string(cols) +
                  ")");
    if (is_salient[std::size_t(index)]) throw Error(where + "salient index " + std::to_string(index) + " is repeated");
    is_salient[std::size_t(index)] = 1;
  }
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      if (!std::isfinite(delta[r * cols + c]))
        throw FormatError(
            "", tensor,
            "delta value " + std::to_string(delta[r * cols + c]) + " at " + detail::position(r, c) + " is not finite");
  return is_salient;
}

// The layout of a quantized delta with its arrays allocated (codes 0, scales and zeros 0),
// salient indices stored ascending.
inline CompressedDelta allocate_quantized(std::int64_t rows, std::int64_t cols, const QuantSpec& spec,
                                          const std::vector<std::int32_t>& salient_idx, const std::string& tensor,
                                          QuantizedArrays*& arrays_out) {
  CompressedDelta layout;
  layout.name = tensor;
  layout.rows = rows;
  layout.cols = cols;
  layout.bits = spec.bits;
  layout.group_size = effective_group_size(spec, cols);
  layout.k = std::int64_t(salient_idx.size());
  auto arrays = std::make_shared<QuantizedArrays>();
  QuantizedArrays& result = *arrays;
  result.salient_idx = salient_idx;
  std::sort(result.salient_idx.begin(), result.salient_idx.end());
  result.qweight.assign(std::size_t(rows * layout.words_per_row()), 0u);
  result.scales.assign(std::size_t(rows * layout.groups()), 0);
  result.zeros.assign(std::size_t(rows * layout.groups()), 0);
  result.salient.assign(std::size_t(rows) * result.salient_idx.size(), 0);
  layout.qweight = result.qweight.data();
  layout.scales = result.scales.data();
  layout.zeros = result.zeros.data();
  layout.salient_idx = result.salient_idx.data();
  layout.salient = result.salient.data();
  arrays_out = arrays.get();
  layout.owner = std::move(arrays);
  return layout;
}

// f16 bits of a salient value; overflow is a FormatError naming the position.
inline std::uint16_t salient_f16(float value, std::int64_t row, std::int64_t col, const std::string& tensor) {
  const std::uint16_t bits = float_to_f16(value);
  if ((bits & 0x7fffu) == 0x7c00u)
    throw FormatError("", tensor,
                      "salient value " + std::to_string(value) + " at " + detail::position(row, col) +
                          " overflows f16");
  return bits;
}

// Quantizes a float32 delta [rows, cols]. `channel_weight` [cols] (E[x^2] per input
// channel, finite and >= 0) may be null for weight-only error. `salient_idx` lists
// the columns stored in f16 instead (in range, unique; any order, stored ascending).
inline CompressedDelta quantize_delta(const float* delta, std::int64_t rows, std::int64_t cols,
                                     const float* channel_weight, const std::vector<std::int32_t>& salient_idx,
                                     const QuantSpec& spec, const std::string& tensor) {
  validate_spec(spec, cols, tensor);
  check_channel_weight(channel_weight, cols, tensor);
  const std::vector<std::uint8_t> is_salient = checked_salient_mask(delta, rows, cols, salient_idx, tensor);
  QuantizedArrays* arrays = nullptr;
  CompressedDelta layout = allocate_quantized(rows, cols, spec, salient_idx, tensor, arrays);
  QuantizedArrays& result = *arrays;
  const std::int64_t groups = layout.groups();
  const std::int64_t group_size = layout.group_size;
  const std::int64_t words_per_row = layout.words_per_row();
  const std::size_t k = result.salient_idx.size();

  const int levels = (1 << spec.bits) - 1;
  const std::vector<float> ratios = clip_ratios(spec);
  std::vector<float> values(static_cast<std::size_t>(group_size)), weights(static_cast<std::size_t>(group_size));
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = delta + r * cols;
    for (std::int64_t g = 0; g < groups; ++g) {
      // Gather the group's non-salient values: only they shape the range and the error.
      std::size_t count = 0;
      float lo0 = 0.0f, hi0 = 0.0f;
      const std::int64_t group_end = std::min((g + 1) * group_size, cols);
      for (std::int64_t c = g * group_size; c < group_end; ++c) {
        if (is_salient[std::size_t(c)]) continue;
        values[count] = row[c];
        weights[count] = channel_weight ? channel_weight[c] : 1.0f;
        lo0 = std::min(lo0, row[c]);
        hi0 = std::max(hi0, row[c]);
        ++count;
      }
      const GroupParams best =
          best_group_params(values.data(), weights.data(), count, lo0, hi0, ratios, levels, tensor, r, g);
      result.scales[std::size_t(r * groups + g)] = best.scale_bits;
      result.zeros[std::size_t(r * groups + g)] = best.zero;
      for (std::int64_t c = g * group_size; c < group_end; ++c)
        codes[std::size_t(c)] = is_salient[std::size_t(c)] ? best.zero : quantize_value(row[c], best, levels);
    }
    MESWITCH_DISPATCH_BITS(spec.bits, BITS,
                           { pack_row<BITS>(codes.data(), cols, result.qweight.data() + r * words_per_row); });
    for (std::size_t i = 0; i < k; ++i)
      result.salient[std::size_t(r) * k + i] = salient_f16(row[result.salient_idx[i]], r, result.salient_idx[i], tensor);
  }
  return layout;
}

// Row r of the scale-free part of the dequantized delta: centred[c] = code - zero, so
// that row[c] = centred[c] * scales[r, c / group_size] before the salient values are
// added. `codes` is scratch of q.cols bytes. Callers validate q first.
inline void centred_row(const CompressedDelta& q, std::int64_t r, std::uint8_t* codes, float* centred) {
  const std::int64_t groups = q.groups();
  MESWITCH_DISPATCH_BITS(q.bits, BITS, { unpack_row<BITS>(q.qweight + r * q.words_per_row(), q.cols, codes); });
  for (std::int64_t g = 0; g < groups; ++g) {
    const float zero = float(q.zeros[std::size_t(r * groups + g)]);
    for (std::int64_t c = g * q.group_size; c < std::min((g + 1) * q.group_size, q.cols); ++c)
      centred[c] = float(codes[std::size_t(c)]) - zero;
  }
}

// Row r of the dequantized delta: (code - zero) * scale, then the salient values added
// into their columns. `codes` is scratch of q.cols bytes. Callers validate q first.
inline void dequantize_row(const CompressedDelta& q, std::int64_t r, std::uint8_t* codes, float* row) {
  MESWITCH_DISPATCH_BITS(q.bits, BITS, { unpack_row<BITS>(q.qweight + r * q.words_per_row(), q.cols, codes); });
  const std::int64_t groups = q.groups();
  for (std::int64_t g = 0; g < groups; ++g) {  // centred_row's (code - zero), then the scale, in one pass
    const float zero = float(q.zeros[std::size_t(r * groups + g)]);
    const float scale = f16_to_float(q.scales[std::size_t(r * groups + g)]);
    const std::int64_t first = g * q.group_size, end = std::min((g + 1) * q.group_size, q.cols);
    const std::uint8_t* __restrict group_codes = codes + first;  // no aliasing: the loop vectorises
    float* __restrict group_row = row + first;
    for (std::int64_t c = 0; c < end - first; ++c) group_row[c] = (float(group_codes[c]) - zero) * scale;
  }
  const std::size_t k = std::size_t(q.k);
  for (std::size_t i = 0; i < k; ++i) row[q.salient_idx[i]] += f16_to_float(q.salient[std::size_t(r) * k + i]);
}

// Rows `rows[0..count)` of the dequantized delta into out [count, cols], by the rule of
// dequantize_row: an embedding lookup reads the codes of the rows it looks up and no
// others. Throws Error for a row outside the delta. Callers validate q first.
inline void dequantize_rows(const CompressedDelta& q, const std::int64_t* rows, std::int64_t count, float* out) {
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.cols));
  for (std::int64_t i = 0; i < count; ++i) {
    if (rows[i] < 0 || rows[i] >= q.rows)
      throw Error("row " + std::to_string(rows[i]) + " is outside delta '" + q.name + "' (" + std::to_string(q.rows) +
                  " rows)");
    dequantize_row(q, rows[i], codes.data(), out + i * q.cols);
  }
}

// out[r, c] = (code - zero) * scale, then out[r, salient_idx[i]] += salient[r, i]:
// exactly what the fused kernels compute (y = x @ dequant(Q)^T + x[:, idx] @ S^T),
// so this is the reference they are tested against.
inline void dequantize_delta(const CompressedDelta& q, float* out) {
  q.validate();
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.cols));
  for (std::int64_t r = 0; r < q.rows; ++r) dequantize_row(q, r, codes.data(), out + r * q.cols);
}

// The dequantized delta split where the scales enter, for training the scales
// (refinement): dequantized = centred * scales[:, c / group_size] + salient_dense, with
// centred [rows, cols] = code - zero and salient_dense [rows, cols] the salient values
// in their columns (0 elsewhere).
inline void scale_free_parts(const CompressedDelta& q, float* centred, float* salient_dense) {
  q.validate();
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.cols));
  const std::size_t k = std::size_t(q.k);
  for (std::int64_t r = 0; r < q.rows; ++r) {
    centred_row(q, r, codes.data(), centred + r * q.cols);
    float* row = salient_dense + r * q.cols;
    std::fill(row, row + q.cols, 0.0f);
    for (std::size_t i = 0; i < k; ++i) row[q.salient_idx[i]] = f16_to_float(q.salient[std::size_t(r) * k + i]);
  }
}

// Per-column squared error of q against delta, sum_r (D[r,c] - deq[r,c])^2, in double,
// accumulated row by row (one row of scratch, never a dense approximation).
inline std::vector<double> column_squared_errors(const CompressedDelta& q, const float* delta) {
  q.validate();
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.cols));
  std::vector<float> row(static_cast<std::size_t>(q.cols));
  std::vector<double> per_column(static_cast<std::size_t>(q.cols), 0.0);
  for (std::int64_t r = 0; r < q.rows; ++r) {
    dequantize_row(q, r, codes.data(), row.data());
    for (std::int64_t c = 0; c < q.cols; ++c) {
      const double difference = double(delta[r * q.cols + c]) - double(row[std::size_t(c)]);
      per_column[std::size_t(c)] += difference * difference;
    }
  }
  return per_column;
}

struct DeltaError {
  double error = 0.0;      // sum_c w_c sum_r (D - deq)^2
  double reference = 0.0;  // sum_c w_c sum_r D^2
};

inline DeltaError quantization_error(const CompressedDelta& q, const float* delta, const float* channel_weight) {
  const std::vector<double> per_column = column_squared_errors(q, delta);
  std::vector<double> norms(per_column.size(), 0.0);
  for (std::int64_t r = 0; r < q.rows; ++r)
    for (std::int64_t c = 0; c < q.cols; ++c) norms[std::size_t(c)] += double(delta[r * q.cols + c]) * double(delta[r * q.cols + c]);
  DeltaError result;
  for (std::int64_t c = 0; c < q.cols; ++c) {
    const double weight = channel_weight ? double(channel_weight[c]) : 1.0;
    result.error += weight * per_column[std::size_t(c)];
    result.reference += weight * norms[std::size_t(c)];
  }
  return result;
}

// sum_i w_i sum_r (delta[r, i] - approx[r, i])^2 in double; w_i = 1 when channel_weight is null.
inline double weighted_squared_error(const float* delta, const float* approx, std::int64_t rows, std::int64_t cols,
                                     const float* channel_weight) {
  std::vector<double> per_column(std::size_t(std::max<std::int64_t>(cols, 0)), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const double difference = double(delta[r * cols + c]) - double(approx[r * cols + c]);
      per_column[std::size_t(c)] += difference * difference;
    }
  double total = 0.0;
  for (std::int64_t c = 0; c < cols; ++c)
    total += (channel_weight ? double(channel_weight[c]) : 1.0) * per_column[std::size_t(c)];
  return total;
}

}  // namespace meswitch
