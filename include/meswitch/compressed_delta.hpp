// One compressed delta: the layout of its five stored tensors, and the rules they obey.
//
// A weight W [rows = out, cols = in] is stored as (docs/format.md)
//
//   W.qweight      U32 [rows, words]    words = ceil(cols * bits / 32); each row one little-endian
//                                       bitstream of b-bit codes, every row starting on a fresh word
//   W.scales       F16 [rows, groups]   groups = ceil(cols / group_size); the last may be shorter
//   W.zeros        U8  [rows, groups]   zero points, each below 2^bits
//   W.salient_idx  I32 [k]              salient input columns, strictly ascending, in [0, cols)
//   W.salient      F16 [rows, k]        their f16 values
//
//   D[r, c] = (code[r, c] - zeros[r, c / group_size]) * scales[r, c / group_size]
//             + salient[r, i] where c = salient_idx[i]
//
// The quantizer produces it (owning its arrays), the artifact reader returns it (over
// the mapped shards), the kernels consume it and the bindings build it over borrowed
// NumPy / torch memory; `validate` is the one place where the pieces are checked
// against each other, so a hostile file and a wrong Python argument are refused the
// same way before any kernel indexes with them.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "meswitch/error.hpp"
#include "meswitch/half.hpp"
#include "meswitch/pack.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

enum class DeltaPiece { qweight, scales, zeros, salient_idx, salient };

inline constexpr DeltaPiece kDeltaPieces[] = {DeltaPiece::qweight, DeltaPiece::scales, DeltaPiece::zeros,
                                              DeltaPiece::salient_idx, DeltaPiece::salient};

// The suffix of the stored tensor (W.qweight ...).
inline const char* delta_piece_name(DeltaPiece piece) {
  switch (piece) {
    case DeltaPiece::qweight: return "qweight";
    case DeltaPiece::scales: return "scales";
    case DeltaPiece::zeros: return "zeros";
    case DeltaPiece::salient_idx: return "salient_idx";
    case DeltaPiece::salient: return "salient";
  }
  throw Error("delta_piece_name: invalid piece");
}

inline DType delta_piece_dtype(DeltaPiece piece) {
  switch (piece) {
    case DeltaPiece::qweight: return DType::U32;
    case DeltaPiece::scales: case DeltaPiece::salient: return DType::F16;
    case DeltaPiece::zeros: return DType::U8;
    case DeltaPiece::salient_idx: return DType::I32;
  }
  throw Error("delta_piece_dtype: invalid piece");
}

// What `validate` looks at. Layout is O(k) and guards every index a kernel computes,
// so the kernels run it on each call; Contents also reads every zero point, scale and
// salient value, once per delta (reader, quantizer, bindings).
enum class DeltaChecks { Layout, Contents };

namespace detail {

// OR of `count` bytes, eight at a time.
inline std::uint8_t or_of_bytes(const std::uint8_t* bytes, std::size_t count) {
  std::uint64_t wide = 0;
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    wide |= word;
  }
  std::uint8_t result = 0;
  for (int shift = 0; shift < 64; shift += 8) result |= std::uint8_t(wide >> shift);
  for (; i < count; ++i) result |= bytes[i];
  return result;
}

// Whether any of `count` f16 values is Inf or NaN, four at a time: (v & 0x7c00) + 0x0400
// reaches 0x8000 exactly when all exponent bits are set, and never carries into the
// next value.
inline bool any_f16_non_finite(const std::uint16_t* values, std::size_t count) {
  constexpr std::uint64_t kExponent = 0x7c007c007c007c00ull, kOne = 0x0400040004000400ull,
                          kTop = 0x8000800080008000ull;
  std::uint64_t wide = 0;
  std::size_t i = 0;
  for (; i + 4 <= count; i += 4) {
    std::uint64_t word;
    std::memcpy(&word, values + i, 8);
    wide |= (word & kExponent) + kOne;
  }
  for (; i < count; ++i) wide |= std::uint64_t((values[i] & 0x7c00u) + 0x0400u);
  return (wide & kTop) != 0;
}

}  // namespace detail

struct CompressedDelta {
  std::string name;  // the weight, e.g. "model.layers.0.mlp.up_proj.weight"; may be empty
  std::int64_t rows = 0, cols = 0;
  int bits = 0;
  std::int64_t group_size = 0;  // actual size in [1, cols]; cols for whole-row groups
  std::int64_t k = 0;           // salient channels

  // Row-major and contiguous, in the stored layout above.
  const std::uint32_t* qweight = nullptr;
  const std::uint16_t* scales = nullptr;  // f16 bits
  const std::uint8_t* zeros = nullptr;
  const std::int32_t* salient_idx = nullptr;
  const std::uint16_t* salient = nullptr;  // f16 bits

  // Keeps the arrays alive where this delta owns them (the quantizer's output) or shares
  // their mapping (the artifact reader); null where they are borrowed (the bindings).
  std::shared_ptr<const void> owner;

  std::int64_t words_per_row() const { return packed_words_per_row(cols, bits); }
  std::int64_t groups() const { return group_size > 0 ? (cols + group_size - 1) / group_size : 0; }

  Shape expected_shape(DeltaPiece piece) const {
    switch (piece) {
      case DeltaPiece::qweight: return {rows, words_per_row()};
      case DeltaPiece::scales: case DeltaPiece::zeros: return {rows, groups()};
      case DeltaPiece::salient_idx: return {k};
      case DeltaPiece::salient: return {rows, k};
    }
    throw Error("expected_shape: invalid piece");
  }

  // "W.qweight", or "qweight" for an unnamed delta.
  std::string tensor_name(DeltaPiece piece) const {
    return name.empty() ? delta_piece_name(piece) : name + "." + delta_piece_name(piece);
  }

  const void* data(DeltaPiece piece) const {
    switch (piece) {
      case DeltaPiece::qweight: return qweight;
      case DeltaPiece::scales: return scales;
      case DeltaPiece::zeros: return zeros;
      case DeltaPiece::salient_idx: return salient_idx;
      case DeltaPiece::salient: return salient;
    }
    throw Error("data: invalid piece");
  }

  // The piece as a read-only tensor (for writing it out or handing it to NumPy).
  TensorView view(DeltaPiece piece) const {
    return TensorView(const_cast<void*>(data(piece)), delta_piece_dtype(piece), expected_shape(piece));
  }

  // Throws FormatError naming the stored tensor (tensor_name) and the field at fault.
  inline void validate(DeltaChecks checks = DeltaChecks::Contents) const;

  // A delta over five tensor views: checks each view's dtype, shape and contiguity
  // against the layout, then validate(checks). `rows` < 0 takes qweight's first
  // dimension and `k` < 0 salient_idx's length (the kernels' callers know neither
  // apart from the tensors); group_size 0 means whole rows. `cols_origin` says where
  // `cols` came from ("x has shape [*, 64]"), so a qweight of another width is reported
  // against that source. The views' memory must outlive the result (owner stays null).
  static inline CompressedDelta over_views(std::string name, std::int64_t rows, std::int64_t cols, int bits,
                                           std::int64_t group_size, std::int64_t k, const TensorView& qweight,
                                           const TensorView& scales, const TensorView& zeros,
                                           const TensorView& salient_idx, const TensorView& salient,
                                           DeltaChecks checks = DeltaChecks::Contents,
                                           const std::string& cols_origin = "");
};

inline void CompressedDelta::validate(DeltaChecks checks) const {
  const auto fail = [&](const std::string& tensor, const std::string& problem) {
    throw FormatError("", tensor, problem);
  };
  if (bits < 1 || bits > 4) fail(name, "bits must be 1..4, got " + std::to_string(bits));
  if (rows < 0 || cols < 1)
    fail(name, "invalid shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "] (rows >= 0, cols >= 1)");
  if (group_size < 1 || group_size > cols)
    fail(name, "group size " + std::to_string(group_size) + " is not in [1, " + std::to_string(cols) +
                   "] (the last of ceil(cols / group_size) groups may be shorter)");
  if (k < 0 || k > cols)
    fail(tensor_name(DeltaPiece::salient_idx),
         "k = " + std::to_string(k) + " salient channels, expected 0..cols = " + std::to_string(cols));
  for (const DeltaPiece piece : kDeltaPieces)
    if (element_count(expected_shape(piece)) > 0 && data(piece) == nullptr)
      fail(tensor_name(piece), "has no data (expected " + std::string(dtype_name(delta_piece_dtype(piece))) + " " +
                                   shape_string(expected_shape(piece)) + ")");

  // Salient columns index x in every kernel: strictly ascending within [0, cols).
  for (std::int64_t i = 0; i < k; ++i) {
    const std::int32_t index = salient_idx[i];
    if (index < 0 || index >= cols)
      fail(tensor_name(DeltaPiece::salient_idx), "salient_idx[" + std::to_string(i) + "] = " + std::to_string(index) +
                                                     " is outside [0, " + std::to_string(cols) + ")");
    if (i > 0 && index <= salient_idx[i - 1])
      fail(tensor_name(DeltaPiece::salient_idx),
           "salient_idx[" + std::to_string(i) + "] = " + std::to_string(index) +
               (index == salient_idx[i - 1] ? " repeats" : " is below") + " salient_idx[" + std::to_string(i - 1) +
               "] = " + std::to_string(salient_idx[i - 1]) + " (must be strictly ascending)");
  }
  if (checks == DeltaChecks::Layout) return;

  // The scans run once per delta over every zero point, scale and salient value, so
  // they OR eight bytes at a time (a per-element branch costs as much as a kernel call)
  // and look for the position only on failure.
  const std::size_t cells = std::size_t(rows * groups());
  if ((detail::or_of_bytes(zeros, cells) >> bits) != 0)
    for (std::size_t i = 0; i < cells; ++i)
      if ((zeros[i] >> bits) != 0)
        fail(tensor_name(DeltaPiece::zeros), "zero point " + std::to_string(zeros[i]) + " at (row " +
                                                 std::to_string(std::int64_t(i) / groups()) + ", group " +
                                                 std::to_string(std::int64_t(i) % groups()) + ") is not below 2^" +
                                                 std::to_string(bits) + " = " + std::to_string(1 << bits));
  // Non-finite f16 have all exponent bits set; the kernels' group trick
  // (s * sum code x - s z X_g) would turn an infinite scale into NaN for every token.
  const auto first_non_finite = [](const std::uint16_t* values, std::size_t count) {
    if (!detail::any_f16_non_finite(values, count)) return count;
    std::size_t i = 0;
    while ((values[i] & 0x7c00u) != 0x7c00u) ++i;
    return i;
  };
  if (const std::size_t at = first_non_finite(scales, cells); at != cells)
    fail(tensor_name(DeltaPiece::scales), "scale " + std::to_string(f16_to_float(scales[at])) + " at (row " +
                                              std::to_string(std::int64_t(at) / groups()) + ", group " +
                                              std::to_string(std::int64_t(at) % groups()) + ") is not finite");
  const std::size_t salient_cells = std::size_t(rows * k);
  if (const std::size_t at = first_non_finite(salient, salient_cells); at != salient_cells)
    fail(tensor_name(DeltaPiece::salient), "salient value " + std::to_string(f16_to_float(salient[at])) +
                                               " at (row " + std::to_string(std::int64_t(at) / k) + ", channel " +
                                               std::to_string(std::int64_t(at) % k) + ") is not finite");
}

inline CompressedDelta CompressedDelta::over_views(std::string name, std::int64_t rows, std::int64_t cols, int bits,
                                                   std::int64_t group_size, std::int64_t k,
                                                   const TensorView& qweight, const TensorView& scales,
                                                   const TensorView& zeros, const TensorView& salient_idx,
                                                   const TensorView& salient, DeltaChecks checks,
                                                   const std::string& cols_origin) {
  CompressedDelta delta;
  delta.name = std::move(name);
  const auto fail = [&](DeltaPiece piece, const std::string& problem) {
    throw FormatError("", delta.tensor_name(piece), problem);
  };
  if (qweight.rank() != 2)
    fail(DeltaPiece::qweight, "must be 2-D [rows, words], got shape " + shape_string(qweight.shape));
  if (salient_idx.rank() != 1)
    fail(DeltaPiece::salient_idx, "must be 1-D [k], got shape " + shape_string(salient_idx.shape));
  if (group_size < 0)
    throw FormatError("", delta.name, "group size must be >= 0 (0 = whole row), got " + std::to_string(group_size));
  delta.rows = rows >= 0 ? rows : qweight.shape[0];
  delta.cols = cols;
  delta.bits = bits;
  delta.group_size = group_size == 0 ? cols : group_size;
  delta.k = k >= 0 ? k : salient_idx.shape[0];
  // Settle bits and the group size first: the expected shapes below derive from them.
  if (bits < 1 || bits > 4 || cols < 1 || delta.group_size > cols) delta.validate(DeltaChecks::Layout);

  const TensorView* views[] = {&qweight, &scales, &zeros, &salient_idx, &salient};
  for (const DeltaPiece piece : kDeltaPieces) {
    const TensorView& view = *views[int(piece)];
    const DType dtype = delta_piece_dtype(piece);
    const Shape expected = delta.expected_shape(piece);
    const std::string what = delta_piece_name(piece);
    if (view.dtype != dtype) fail(piece, what + " must be " + dtype_name(dtype) + ", got " + dtype_name(view.dtype));
    if (piece == DeltaPiece::qweight && view.shape[0] == delta.rows && view.shape[1] != expected[1]) {
      const std::string origin = cols_origin.empty() ? "cols = " + std::to_string(cols) : cols_origin;
      fail(piece, origin + " but qweight " + shape_string(view.shape) + " holds " + std::to_string(bits) +
                      "-bit codes for " + std::to_string(view.shape[1] * 32 / bits) + " columns (" +
                      std::to_string(expected[1]) + " words per row expected)");
    }
    if (view.shape != expected)
      fail(piece, what + " has shape " + shape_string(view.shape) + ", expected " + shape_string(expected) + " (" +
                      std::to_string(delta.rows) + " rows, " + std::to_string(cols) + " columns, " +
                      std::to_string(bits) + " bits, group size " + std::to_string(delta.group_size) + ", k " +
                      std::to_string(delta.k) + ")");
    if (!view.is_contiguous())
      fail(piece, what + " must be contiguous (row-major), strides " + shape_string(view.strides));
  }
  delta.qweight = qweight.data_as<const std::uint32_t>();
  delta.scales = scales.data_as<const std::uint16_t>();
  delta.zeros = zeros.data_as<const std::uint8_t>();
  delta.salient_idx = salient_idx.data_as<const std::int32_t>();
  delta.salient = salient.data_as<const std::uint16_t>();
  delta.validate(checks);
  return delta;
}

}  // namespace meswitch
