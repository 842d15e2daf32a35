// A compressed delta repacked into the tile layout (tile_layout.hpp), on the host.
//
// The artifact keeps the canonical layout (compressed_delta.hpp); a delta is repacked
// once, when it is loaded for a GPU, and the GPU copy is this layout byte for byte. The
// repack is plain host code (no CUDA needed), so the tests check it on any machine, and
// `untile_codes` inverts it to prove nothing is lost.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/cuda/tile_layout.hpp"
#include "meswitch/dispatch.hpp"
#include "meswitch/error.hpp"
#include "meswitch/pack.hpp"

namespace meswitch::cuda {

// Sizes of the four tiled arrays of a delta of this shape (element counts).
struct TiledSizes {
  std::int64_t codes = 0, params = 0, salient_idx = 0, salient = 0;

  static TiledSizes of(std::int64_t rows, std::int64_t cols, int bits, std::int64_t groups, std::int64_t k) {
    return {rows * cols * bits / 32, rows * groups, k, rows * k};
  }
  std::int64_t bytes() const { return codes * 4 + params * 4 + salient_idx * 4 + salient * 2; }
};

// Throws FormatError naming the delta when the CUDA kernels cannot take it: rows and
// columns must be multiples of 64 and the group size a multiple of 16 (or the whole row).
inline void check_tileable(std::int64_t rows, std::int64_t cols, int bits, std::int64_t group_size,
                           const std::string& name) {
  const auto fail = [&](const std::string& problem) { throw FormatError("", name, "the CUDA kernels need " + problem); };
  constexpr int multiple = tile::kDimensionMultiple;
  if (rows % multiple != 0 || cols % multiple != 0 || rows <= 0 || cols <= 0)
    fail("rows and columns that are positive multiples of " + std::to_string(multiple) + ", got [" +
         std::to_string(rows) + ", " + std::to_string(cols) + "]");
  if (bits < 1 || bits > 4) fail("1 to 4 bits, got " + std::to_string(bits));
  if (group_size != cols && (group_size <= 0 || group_size % tile::kStepCols != 0 || group_size > cols))
    fail("a group size that is a multiple of " + std::to_string(tile::kStepCols) + " or the whole row (" +
         std::to_string(cols) + "), got " + std::to_string(group_size));
}

inline void check_tileable(const CompressedDelta& delta) {
  check_tileable(delta.rows, delta.cols, delta.bits, delta.group_size, delta.name);
}

// Writes `delta` in the tile layout into caller-provided arrays of TiledSizes::of(...)
// elements each (pinned staging buffers, NumPy arrays). The delta's layout must be valid
// (CompressedDelta::validate); check_tileable runs here.
inline void tile_delta_into(const CompressedDelta& delta, std::uint32_t* codes, std::uint32_t* params,
                            std::int32_t* salient_idx, std::uint16_t* salient) {
  check_tileable(delta);
  const std::int64_t rows = delta.rows, cols = delta.cols, groups = delta.groups(), k = delta.k;
  const std::int64_t row_tiles = rows / tile::kRows, col_tiles = cols / tile::kCols;
  const std::int64_t words = delta.words_per_row();
  const int bits = delta.bits;
  std::vector<std::uint8_t> tile_rows(std::size_t(tile::kRows * cols));
  for (std::int64_t rt = 0; rt < row_tiles; ++rt) {
    MESWITCH_DISPATCH_BITS(bits, BITS, {
      for (int i = 0; i < tile::kRows; ++i)
        unpack_row<BITS>(delta.qweight + (rt * tile::kRows + i) * words, cols, tile_rows.data() + i * cols);
    });
    for (std::int64_t kt = 0; kt < col_tiles; ++kt)
      for (int lane = 0; lane < tile::kLanes; ++lane) {
        std::uint32_t lane_words[4] = {0, 0, 0, 0};
        for (int pair = 0; pair < tile::kPairs; ++pair) {
          const int step = tile::step_of_pair(pair), f = tile::fragment_of_pair(pair);
          const int row = tile::fragment_row(lane, f);
          for (int e = 0; e < 2; ++e) {
            const std::uint32_t code = tile_rows[std::size_t(row * cols + kt * tile::kCols + tile::fragment_col(lane, step, f, e))];
            for (int p = 0; p < tile::plane_count(bits); ++p) {
              const tile::Plane plane = tile::plane_of(bits, p);
              const std::uint32_t part = (code >> plane.code_shift) & ((1u << plane.width) - 1u);
              lane_words[tile::plane_word(plane, pair)] |= part << tile::plane_bit(plane, pair, e);
            }
          }
        }
        for (int w = 0; w < bits; ++w) codes[tile::code_word_index(rt, kt, col_tiles, bits, w, lane)] = lane_words[w];
      }
    for (std::int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < tile::kRows; ++i) {
        const std::int64_t at = (rt * tile::kRows + i) * groups + g;
        params[tile::param_index(rt, g, groups, i)] = tile::pack_param(delta.scales[at], delta.zeros[at]);
      }
    for (std::int64_t j = 0; j < k; ++j)
      for (int i = 0; i < tile::kRows; ++i)
        salient[tile::salient_index(rt, j, k, i)] = delta.salient[(rt * tile::kRows + i) * k + j];
  }
  for (std::int64_t j = 0; j < k; ++j) salient_idx[j] = delta.salient_idx[j];
}

// A delta in the tile layout, owning its host arrays.
struct TiledDelta {
  std::string name;
  std::int64_t rows = 0, cols = 0, group_size = 0, k = 0;
  int bits = 0;
  std::vector<std::uint32_t> codes, params;
  std::vector<std::int32_t> salient_idx;
  std::vector<std::uint16_t> salient;

  std::int64_t groups() const { return (cols + group_size - 1) / group_size; }
  TiledSizes sizes() const { return TiledSizes::of(rows, cols, bits, groups(), k); }
};

inline TiledDelta tile_delta(const CompressedDelta& delta) {
  check_tileable(delta);
  TiledDelta tiled;
  tiled.name = delta.name;
  tiled.rows = delta.rows;
  tiled.cols = delta.cols;
  tiled.group_size = delta.group_size;
  tiled.k = delta.k;
  tiled.bits = delta.bits;
  const TiledSizes sizes = tiled.sizes();
  tiled.codes.resize(std::size_t(sizes.codes));
  tiled.params.resize(std::size_t(sizes.params));
  tiled.salient_idx.resize(std::size_t(sizes.salient_idx));
  tiled.salient.resize(std::size_t(sizes.salient));
  tile_delta_into(delta, tiled.codes.data(), tiled.params.data(), tiled.salient_idx.data(), tiled.salient.data());
  return tiled;
}

// The canonical codes [rows, cols] back from the tile layout (the repack's inverse).
inline std::vector<std::uint8_t> untile_codes(const TiledDelta& tiled) {
  const std::int64_t col_tiles = tiled.cols / tile::kCols;
  std::vector<std::uint8_t> codes(std::size_t(tiled.rows * tiled.cols));
  for (std::int64_t r = 0; r < tiled.rows; ++r)
    for (std::int64_t c = 0; c < tiled.cols; ++c) {
      const tile::FragmentSlot slot = tile::slot_of(int(r % tile::kRows), int(c % tile::kCols));
      const int pair = tile::pair_of(slot.step, slot.fragment);
      std::uint32_t code = 0;
      for (int p = 0; p < tile::plane_count(tiled.bits); ++p) {
        const tile::Plane plane = tile::plane_of(tiled.bits, p);
        const std::uint32_t word = tiled.codes[std::size_t(tile::code_word_index(
            r / tile::kRows, c / tile::kCols, col_tiles, tiled.bits, tile::plane_word(plane, pair), slot.lane))];
        code |= ((word >> tile::plane_bit(plane, pair, slot.element)) & ((1u << plane.width) - 1u)) << plane.code_shift;
      }
      codes[std::size_t(r * tiled.cols + c)] = std::uint8_t(code);
    }
  return codes;
}

}  // namespace meswitch::cuda
