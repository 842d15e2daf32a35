// Delta decomposition of one tensor: expert = base + delta (+ extra rows).
//
// Base and expert may be stored in different floating dtypes (a bf16 base and an
// f16 fine-tune is common); both are widened to f32 and subtracted there, which is
// exact for 16-bit inputs up to the final f32 rounding. A 1-D tensor (norm, bias)
// is a single row [1, n]; higher ranks are [shape[0], prod(shape[1:])]. An expert
// with more rows than the base (an expanded vocabulary in embed_tokens/lm_head)
// has no base rows to subtract from: those rows are returned whole, in `extra`.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

struct DeltaTensor {
  std::int64_t rows = 0, cols = 0;
  std::vector<float> delta;  // [rows, cols] = expert[:rows] - base
  std::int64_t extra_rows = 0;
  std::vector<float> extra;  // [extra_rows, cols]: expert rows beyond the base's
};

namespace detail {

inline std::string describe_pair(const TensorView& base, const TensorView& expert) {
  return std::string("base ") + dtype_name(base.dtype) + " " + shape_string(base.shape) + " vs expert " +
         dtype_name(expert.dtype) + " " + shape_string(expert.shape);
}

// Rows and columns of a tensor seen as a matrix.
inline void matrix_shape(const Shape& shape, std::int64_t& rows, std::int64_t& cols) {
  if (shape.size() <= 1) {
    rows = 1;
    cols = shape.empty() ? 1 : shape[0];
    return;
  }
  rows = shape[0];
  cols = 1;
  for (std::size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
}

// Widens elements [first, first + count) of a contiguous floating view to float32,
// rejecting NaN/Inf with the (row, col) of the first one.
inline void widen_checked(const TensorView& view, std::size_t first, std::size_t count, float* out,
                          std::int64_t cols, const char* role, const std::string& tensor, const std::string& pair) {
  const std::size_t item = dtype_size(view.dtype);
  convert_to_f32(static_cast<const std::uint8_t*>(view.data) + first * item, view.dtype, out, count);
  for (std::size_t i = 0; i < count; ++i)
    if (!std::isfinite(out[i])) {
      const auto at = std::int64_t(first + i);
      throw FormatError("", tensor,
                        std::string("non-finite value ") + std::to_string(out[i]) + " in the " + role + " at (" +
                            std::to_string(at / cols) + ", " + std::to_string(at % cols) + ") (" + pair + ")");
    }
}

}  // namespace detail

inline DeltaTensor compute_delta(const TensorView& base, const TensorView& expert, const std::string& tensor) {
  const std::string pair = detail::describe_pair(base, expert);
  if (!is_floating(base.dtype) || !is_floating(expert.dtype))
    throw FormatError("", tensor, "delta needs floating tensors (F32, F16, BF16): " + pair);
  if (!base.is_contiguous() || !expert.is_contiguous())
    throw FormatError("", tensor, "delta needs contiguous tensors: " + pair);
  if (base.rank() != expert.rank()) throw FormatError("", tensor, "rank differs: " + pair);
  for (std::size_t i = 1; i < base.rank(); ++i)
    if (base.shape[i] != expert.shape[i]) throw FormatError("", tensor, "column shape differs: " + pair);
  if (base.rank() == 1 && base.shape[0] != expert.shape[0]) throw FormatError("", tensor, "length differs: " + pair);
  for (std::int64_t dim : base.shape)
    if (dim < 0) throw FormatError("", tensor, "negative dimension: " + pair);
  for (std::int64_t dim : expert.shape)
    if (dim < 0) throw FormatError("", tensor, "negative dimension: " + pair);

  DeltaTensor result;
  std::int64_t expert_rows = 0;
  detail::matrix_shape(base.shape, result.rows, result.cols);
  detail::matrix_shape(expert.shape, expert_rows, result.cols);
  if (expert_rows < result.rows)
    throw FormatError("", tensor,
                      "expert has fewer rows than the base (" + std::to_string(expert_rows) + " < " +
                          std::to_string(result.rows) + "): " + pair);
  const std::int64_t cols = std::max<std::int64_t>(result.cols, 1);

  // The delta is the only full-size float32 buffer: the expert is widened through a
  // small chunk, so peak memory stays near one float32 copy of the tensor.
  const std::size_t total = static_cast<std::size_t>(base.numel());
  result.delta.resize(total);
  detail::widen_checked(base, 0, total, result.delta.data(), cols, "base", tensor, pair);
  constexpr std::size_t kChunk = 1 << 16;
  std::vector<float> chunk(std::min(kChunk, total));
  for (std::size_t first = 0; first < total; first += kChunk) {
    const std::size_t count = std::min(kChunk, total - first);
    detail::widen_checked(expert, first, count, chunk.data(), cols, "expert", tensor, pair);
    for (std::size_t i = 0; i < count; ++i) result.delta[first + i] = chunk[i] - result.delta[first + i];
  }
  result.extra_rows = expert_rows - result.rows;
  result.extra.resize(static_cast<std::size_t>(expert.numel()) - total);
  if (!result.extra.empty())
    detail::widen_checked(expert, total, result.extra.size(), result.extra.data(), cols, "expert", tensor, pair);
  return result;
}

}  // namespace meswitch
