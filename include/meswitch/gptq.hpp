// Error-compensating quantization of a delta (GPTQ: the OBQ update applied column by column).
//
// Round-to-nearest (quantize.hpp) rounds every value on its own. What a linear layer's
// delta D [rows, cols] is judged by is its output on the layer's inputs x:
//
//   E_x ||(D - Q) x||^2 = sum_r e_r^T H e_r,   H = E[x x^T] [cols, cols], e_r = row r of D - Q
//
// so an error in one input channel can be cancelled by the channels correlated with it
// that are not yet quantized. The columns are quantized in a fixed order; after the value
// w_p of column p is rounded to q_p, its scaled error err = (w_p - q_p) / U[p, p] is pushed
// onto every later column j: w_j -= err * U[p, j], where U is the upper Cholesky factor of
// H^-1 (H^-1 = U^T U, in the processing order). That is the least-squares (OBS) update of
// the remaining columns for the error just made; U holds it for every p at once.
//
// How the work is laid out, and why:
//   order      The non-salient columns in natural order (or by descending H[p, p] with
//              act_order: the most active channels first, while many columns are left to
//              absorb their error), then the salient columns. Salient columns are stored in
//              f16, so they take almost no error themselves and absorb everyone else's.
//   groups     By default ("static groups") each group's scale and zero point are RTN's,
//              chosen from the delta before any update: the pushed errors make the
//              remaining values of a delta spread wider than the delta itself, and a range
//              refitted to them ("dynamic groups", GptqSpec::static_groups = false) wastes
//              levels on that spread. Dynamic groups keep each group's columns consecutive
//              in the processing order (natural order only), blocks hold whole groups, and
//              a group's parameters are chosen from its values as they stand when it
//              begins (every earlier error applied).
//   blocks     Lazy batches: a column's update reaches the rest of its block at once; the
//              columns after the block get the whole block's updates as one matrix product
//              Err [rows, block] x U[block, rest]. That product is where the time goes
//              (about rows * cols^2 multiply-adds per matrix).
//   rows       Rows are independent given U, so they go in chunks over the threads, each
//              chunk a dense working copy of its rows in the processing order.
//   U          From H + lambda I, lambda = damping * mean(diag H); a column never active in
//              calibration gets H[p, p] = 1 first (it then takes no error and gives none).
//              With R upper triangular and H = R R^T (the Cholesky factor of H with rows and
//              columns reversed, reversed back), H^-1 = R^-T R^-1, so U = R^-1: one
//              factorization and one triangular inverse, in place in one [cols, cols] buffer.
//   precision  double up to kGptqDoubleWidth columns; float above it, where the factor alone
//              would be 1.6 GB in double for a 14336-wide input (0.8 GB in float).
//
// Without calibration (H = I) U is diagonal, nothing is pushed and the result is RTN's.
// The output is an ordinary CompressedDelta: readers and kernels do not change.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/cpu/threading.hpp"
#include "meswitch/error.hpp"
#include "meswitch/quantize.hpp"

namespace meswitch {

struct GptqSpec {
  double damping = 0.01;          // lambda = damping * mean(diag H)
  std::int64_t block_size = 128;  // columns per lazy batch
  bool act_order = false;         // quantize by descending H[p, p] (groups then static)
  // Group scales and zeros from the delta before any update (as RTN chooses them) rather
  // than from the updated values when the group begins. On deltas the updated values
  // spread wider than the delta, so the static choice is the default (it halves the
  // output error of dynamic groups at 2 bits in tests/cpp/test_gptq.cpp).
  bool static_groups = true;
  int num_threads = 0;            // 0: MESWITCH_NUM_THREADS, else the hardware count
};

inline constexpr std::int64_t kGptqDoubleWidth = 4096;

namespace detail {

template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rows per work item: large enough that Err x U is a real matrix product.
inline constexpr std::int64_t kGptqRowChunk = 256;

// The upper triangle of `a` (upper triangular, non-singular) replaced by its inverse;
// the strict lower triangle is neither read nor written. Recursive halving,
//   [R11 R12; 0 R22]^-1 = [R11^-1, -R11^-1 R12 R22^-1; 0, R22^-1],
// with the off-diagonal block solved in place, so no temporary of the matrix's size.
template <typename Scalar>
void invert_upper_in_place(Eigen::Ref<RowMatrix<Scalar>> a) {
  const Eigen::Index n = a.rows();
  if (n <= 32) {
    for (Eigen::Index j = 0; j < n; ++j) {
      // Column j of the inverse from the already inverted leading block; entries above
      // row i are read before they are overwritten because i only grows.
      a(j, j) = Scalar(1) / a(j, j);
      const Scalar minus_diagonal = -a(j, j);
      for (Eigen::Index i = 0; i < j; ++i) {
        Scalar sum = 0;
        for (Eigen::Index l = i; l < j; ++l) sum += a(i, l) * a(l, j);
        a(i, j) = sum * minus_diagonal;
      }
    }
    return;
  }
  const Eigen::Index half = n / 2;
  auto top_left = a.topLeftCorner(half, half);
  auto top_right = a.topRightCorner(half, n - half);
  auto bottom_right = a.bottomRightCorner(n - half, n - half);
  top_left.template triangularView<Eigen::Upper>().solveInPlace(top_right);
  bottom_right.template triangularView<Eigen::Upper>().template solveInPlace<Eigen::OnTheRight>(top_right);
  top_right = -top_right;
  invert_upper_in_place<Scalar>(top_left);
  invert_upper_in_place<Scalar>(bottom_right);
}

// Processing order: non-salient columns (natural, or by descending H[c, c] with ties by
// index), then the salient columns ascending.
inline std::vector<std::int64_t> gptq_order(const float* hessian, std::int64_t cols,
                                            const std::vector<std::uint8_t>& is_salient, bool act_order) {
  std::vector<std::int64_t> order;
  order.reserve(std::size_t(cols));
  for (std::int64_t c = 0; c < cols; ++c)
    if (!is_salient[std::size_t(c)]) order.push_back(c);
  if (act_order)
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return hessian[a * cols + a] > hessian[b * cols + b];
    });
  for (std::int64_t c = 0; c < cols; ++c)
    if (is_salient[std::size_t(c)]) order.push_back(c);
  return order;
}

}  // namespace detail

// Checks a calibration Hessian [cols, cols]: every entry finite, the diagonal >= 0.
inline void check_hessian(const float* hessian, std::int64_t cols, const std::string& tensor) {
  for (std::int64_t i = 0; i < cols; ++i)
    for (std::int64_t j = 0; j < cols; ++j) {
      const float value = hessian[i * cols + j];
      if (!std::isfinite(value) || (i == j && value < 0.0f))
        throw FormatError("", tensor,
                          "calibration Hessian entry " + std::to_string(value) + " at " + detail::position(i, j) +
                              (i == j ? " is not finite and >= 0" : " is not finite"));
    }
}

// U [cols, cols] (upper triangle; the rest is scratch), the upper Cholesky factor of
// (H + lambda I)^-1 with rows and columns in `order`.
template <typename Scalar>
detail::RowMatrix<Scalar> inverse_hessian_factor(const float* hessian, std::int64_t cols,
                                                 const std::vector<std::int64_t>& order, double damping,
                                                 const std::string& tensor) {
  const Eigen::Index n = Eigen::Index(cols);
  detail::RowMatrix<Scalar> factor(n, n);
  for (Eigen::Index p = 0; p < n; ++p) {
    const float* source = hessian + order[std::size_t(p)] * cols;
    for (Eigen::Index q = 0; q < n; ++q) factor(p, q) = Scalar(source[order[std::size_t(q)]]);
  }
  double mean_diagonal = 0.0;
  for (Eigen::Index p = 0; p < n; ++p) {
    if (factor(p, p) == Scalar(0)) factor(p, p) = Scalar(1);  // a channel never active
    mean_diagonal += double(factor(p, p));
  }
  mean_diagonal /= double(std::max<Eigen::Index>(n, 1));
  factor.diagonal().array() += Scalar(damping * mean_diagonal);
  factor.reverseInPlace();
  Eigen::LLT<Eigen::Ref<detail::RowMatrix<Scalar>>, Eigen::Lower> cholesky(factor);
  if (cholesky.info() != Eigen::Success)
    throw FormatError("", tensor,
                      "calibration Hessian is not positive definite after damping " + std::to_string(damping) +
                          " (raise the damping, or check the statistics)");
  factor.reverseInPlace();
  detail::invert_upper_in_place<Scalar>(factor);
  return factor;
}

// GPTQ quantization of a float32 delta [rows, cols] given the calibration Hessian
// `hessian` [cols, cols] (row-major, symmetric, positive semi-definite; E[x x^T] of the
// layer's input). Settings, salient columns and the output are those of quantize_delta;
// the clip search (spec.clip_grid > 1) weighs its error by diag(H).
template <typename Scalar>
CompressedDelta quantize_delta_gptq_as(const float* delta, std::int64_t rows, std::int64_t cols, const float* hessian,
                                       const std::vector<std::int32_t>& salient_idx, const QuantSpec& spec,
                                       const GptqSpec& gptq, const std::string& tensor) {
  validate_spec(spec, cols, tensor);
  const std::string where = detail::tensor_prefix(tensor);
  if (!(gptq.damping > 0.0 && std::isfinite(gptq.damping)))
    throw Error(where + "damping must be a finite number > 0, got " + std::to_string(gptq.damping));
  if (gptq.block_size < 1) throw Error(where + "block_size must be >= 1, got " + std::to_string(gptq.block_size));
  if (hessian == nullptr) throw Error(where + "GPTQ needs the calibration Hessian");
  check_hessian(hessian, cols, tensor);
  const std::vector<std::uint8_t> is_salient = checked_salient_mask(delta, rows, cols, salient_idx, tensor);
  QuantizedArrays* arrays = nullptr;
  CompressedDelta layout = allocate_quantized(rows, cols, spec, salient_idx, tensor, arrays);
  QuantizedArrays& result = *arrays;
  const std::int64_t groups = layout.groups(), group_size = layout.group_size, k = layout.k;
  const int levels = (1 << spec.bits) - 1;
  const std::vector<float> ratios = clip_ratios(spec);
  const bool static_groups = gptq.static_groups || gptq.act_order || groups == 1;

  const std::vector<std::int64_t> order = detail::gptq_order(hessian, cols, is_salient, gptq.act_order);
  const detail::RowMatrix<Scalar> factor = inverse_hessian_factor<Scalar>(hessian, cols, order, gptq.damping, tensor);
  std::vector<float> diagonal(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) diagonal[std::size_t(c)] = hessian[c * cols + c];
  std::vector<std::int64_t> salient_slot(static_cast<std::size_t>(cols), -1);
  for (std::int64_t i = 0; i < k; ++i) salient_slot[std::size_t(result.salient_idx[std::size_t(i)])] = i;

  // Blocks [begin, end) of processing positions. With dynamic groups a block is whole
  // groups (first positions recorded in group_start), so a group's values are all
  // up to date when it begins; the salient tail and static groups use plain blocks.
  const std::int64_t non_salient = cols - k;
  std::vector<std::int64_t> block_starts;
  std::vector<std::int64_t> group_start(static_cast<std::size_t>(cols), -1);  // position -> group starting there
  std::vector<std::int64_t> group_end(static_cast<std::size_t>(groups), 0);  // group -> its end position
  if (!static_groups) {
    std::int64_t position = 0, block_begin = 0;
    block_starts.push_back(0);
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::int64_t first = position;
      for (std::int64_t c = g * group_size; c < std::min((g + 1) * group_size, cols); ++c)
        if (!is_salient[std::size_t(c)]) ++position;
      if (position == first) continue;  // every column of the group is salient
      if (first - block_begin >= gptq.block_size) {
        block_starts.push_back(first);
        block_begin = first;
      }
      group_start[std::size_t(first)] = g;
      group_end[std::size_t(g)] = position;
    }
    for (std::int64_t p = non_salient; p < cols; p += gptq.block_size)
      if (p > block_starts.back()) block_starts.push_back(p);
  } else {
    for (std::int64_t p = 0; p < cols; p += gptq.block_size) block_starts.push_back(p);
  }
  block_starts.push_back(cols);

  const std::int64_t chunks = (rows + detail::kGptqRowChunk - 1) / detail::kGptqRowChunk;
  const std::int64_t words_per_row = layout.words_per_row();
  cpu::parallel_for(chunks, cpu::resolve_num_threads(gptq.num_threads), [&](int, std::int64_t chunk) {
    const std::int64_t first_row = chunk * detail::kGptqRowChunk;
    const Eigen::Index count = Eigen::Index(std::min(rows, first_row + detail::kGptqRowChunk) - first_row);
    detail::RowMatrix<Scalar> work(count, Eigen::Index(cols));
    for (Eigen::Index i = 0; i < count; ++i)
      for (std::int64_t p = 0; p < cols; ++p)
        work(i, Eigen::Index(p)) = Scalar(delta[(first_row + i) * cols + order[std::size_t(p)]]);
    std::vector<GroupParams> params(static_cast<std::size_t>(count * groups));
    std::vector<float> values(static_cast<std::size_t>(group_size)), weights(static_cast<std::size_t>(group_size));
    // A group's parameters from the values of `columns` (natural columns, or positions in
    // the processing order with `positions`).
    const auto choose = [&](Eigen::Index i, std::int64_t g, const auto& value_at, const auto& columns,
                            bool positions) {
      std::size_t n = 0;
      float lo0 = 0.0f, hi0 = 0.0f;
      for (const std::int64_t c : columns) {
        values[n] = value_at(c);
        weights[n] = diagonal[std::size_t(positions ? order[std::size_t(c)] : c)];
        lo0 = std::min(lo0, values[n]);
        hi0 = std::max(hi0, values[n]);
        ++n;
      }
      params[std::size_t(i * groups + g)] =
          best_group_params(values.data(), weights.data(), n, lo0, hi0, ratios, levels, tensor, first_row + i, g);
    };
    std::vector<std::int64_t> columns;
    if (static_groups) {  // from the delta before any update, as RTN chooses them
      for (std::int64_t g = 0; g < groups; ++g) {
        columns.clear();
        for (std::int64_t c = g * group_size; c < std::min((g + 1) * group_size, cols); ++c)
          if (!is_salient[std::size_t(c)]) columns.push_back(c);
        for (Eigen::Index i = 0; i < count; ++i)
          choose(i, g, [&](std::int64_t c) { return delta[(first_row + i) * cols + c]; }, columns, false);
      }
    }
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(count * cols), 0);
    detail::RowMatrix<Scalar> errors(count, Eigen::Index(gptq.block_size + group_size));
    for (std::size_t b = 0; b + 1 < block_starts.size(); ++b) {
      const std::int64_t begin = block_starts[b], end = block_starts[b + 1];
      if (errors.cols() < end - begin) errors.resize(count, Eigen::Index(end - begin));
      for (std::int64_t p = begin; p < end; ++p) {
        const std::int64_t column = order[std::size_t(p)];
        if (const std::int64_t g = group_start[std::size_t(p)]; g >= 0) {
          columns.resize(std::size_t(group_end[std::size_t(g)] - p));
          std::iota(columns.begin(), columns.end(), p);  // positions, consecutive in this order
          for (Eigen::Index i = 0; i < count; ++i)
            choose(i, g, [&](std::int64_t position) { return float(work(i, Eigen::Index(position))); }, columns,
                   true);
        }
        const Scalar pivot = factor(Eigen::Index(p), Eigen::Index(p));
        const std::int64_t slot = salient_slot[std::size_t(column)];
        for (Eigen::Index i = 0; i < count; ++i) {
          const Scalar value = work(i, Eigen::Index(p));
          float approx;
          if (slot >= 0) {
            const std::uint16_t bits = salient_f16(float(value), first_row + i, column, tensor);
            result.salient[std::size_t((first_row + i) * k + slot)] = bits;
            approx = f16_to_float(bits);
          } else {
            const GroupParams& group = params[std::size_t(i * groups + column / group_size)];
            const std::uint8_t code = quantize_value(float(value), group, levels);
            codes[std::size_t(i * cols + column)] = code;
            approx = dequantize_value(code, group);
          }
          errors(i, Eigen::Index(p - begin)) = (value - Scalar(approx)) / pivot;
        }
        const Eigen::Index rest = Eigen::Index(end - p - 1);
        if (rest > 0)
          work.middleCols(Eigen::Index(p + 1), rest).noalias() -=
              errors.col(Eigen::Index(p - begin)) * factor.row(Eigen::Index(p)).segment(Eigen::Index(p + 1), rest);
      }
      if (end < cols)
        work.rightCols(Eigen::Index(cols - end)).noalias() -=
            errors.leftCols(Eigen::Index(end - begin)) *
            factor.block(Eigen::Index(begin), Eigen::Index(end), Eigen::Index(end - begin), Eigen::Index(cols - end));
    }
    for (Eigen::Index i = 0; i < count; ++i) {
      const std::int64_t r = first_row + i;
      std::uint8_t* row_codes = codes.data() + i * cols;
      for (std::int64_t g = 0; g < groups; ++g) {
        const GroupParams& group = params[std::size_t(i * groups + g)];
        result.scales[std::size_t(r * groups + g)] = group.scale_bits;
        result.zeros[std::size_t(r * groups + g)] = group.zero;
      }
      for (std::int64_t slot = 0; slot < k; ++slot) {
        const std::int64_t column = result.salient_idx[std::size_t(slot)];
        row_codes[column] = params[std::size_t(i * groups + column / group_size)].zero;
      }
      MESWITCH_DISPATCH_BITS(spec.bits, BITS,
                             { pack_row<BITS>(row_codes, cols, result.qweight.data() + r * words_per_row); });
    }
  });
  return layout;
}

// GPTQ in double up to kGptqDoubleWidth columns, in float beyond.
inline CompressedDelta quantize_delta_gptq(const float* delta, std::int64_t rows, std::int64_t cols,
                                           const float* hessian, const std::vector<std::int32_t>& salient_idx,
                                           const QuantSpec& spec, const GptqSpec& gptq, const std::string& tensor) {
  if (cols <= kGptqDoubleWidth)
    return quantize_delta_gptq_as<double>(delta, rows, cols, hessian, salient_idx, spec, gptq, tensor);
  return quantize_delta_gptq_as<float>(delta, rows, cols, hessian, salient_idx, spec, gptq, tensor);
}

// The layer output error sum_r e_r^T H e_r of q against delta (e = delta - dequantized)
// and the same form of the delta itself, in double, a chunk of rows at a time.
inline DeltaError hessian_weighted_error(const CompressedDelta& q, const float* delta, const float* hessian) {
  q.validate();
  const Eigen::Index cols = Eigen::Index(q.cols);
  const Eigen::Map<const detail::RowMatrix<float>> h(hessian, cols, cols);
  const detail::RowMatrix<double> h64 = h.cast<double>();
  DeltaError result;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.cols));
  std::vector<float> row(static_cast<std::size_t>(q.cols));
  const Eigen::Index chunk = Eigen::Index(detail::kGptqRowChunk);
  detail::RowMatrix<double> error(chunk, cols), original(chunk, cols);
  for (std::int64_t first = 0; first < q.rows; first += chunk) {
    const Eigen::Index count = Eigen::Index(std::min<std::int64_t>(chunk, q.rows - first));
    for (Eigen::Index i = 0; i < count; ++i) {
      dequantize_row(q, first + i, codes.data(), row.data());
      for (Eigen::Index c = 0; c < cols; ++c) {
        original(i, c) = double(delta[(first + i) * cols + c]);
        error(i, c) = original(i, c) - double(row[std::size_t(c)]);
      }
    }
    result.error += ((error.topRows(count) * h64).cwiseProduct(error.topRows(count))).sum();
    result.reference += ((original.topRows(count) * h64).cwiseProduct(original.topRows(count))).sum();
  }
  return result;
}

}  // namespace meswitch
