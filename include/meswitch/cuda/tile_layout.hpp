// The tile layout of a compressed delta on the GPU: where each code, scale, zero point
// and salient value lives, and how one lane turns its codes into tensor-core operands.
// Host and device share every function here (MESWITCH_HOST_DEVICE); the kernel
// (delta_gemm.cuh) explains why the layout is what it is, this header only what it is.
//
// A tile is 16 output rows x 64 input columns: the A operand of four mma.m16n8k16 steps
// (step s covers columns [16 s, 16 s + 16) of the tile). Lane l = 4 g + t (g = l / 4,
// t = l % 4) holds, for every step, the fragment registers f = 0..3 that the PTX ISA
// assigns it ("Matrix Fragments for mma.m16n8k16 with floating point type"):
//
//   register f   rows          mma k (within the step)      tile column (this layout)
//   0            g             2t, 2t+1                     16s + 4t + 0, +1
//   1            g + 8         2t, 2t+1                     16s + 4t + 0, +1
//   2            g             2t+8, 2t+9                   16s + 4t + 2, +3
//   3            g + 8         2t+8, 2t+9                   16s + 4t + 2, +3
//
// The mma does not care which tile column stands behind each k as long as A and B agree,
// so lane t's four k of a step are four *adjacent* columns: its B operand (the
// activations) is one 8-byte load per token and step, and a step never leaves its 16
// columns, so a quantization group (a multiple of 16 columns) never splits a step.
//
// Codes. A lane holds 2 rows x 16 columns = 32 codes of a tile, as 16 pairs
// p = 4 s + f (the two elements of fragment register f in step s), in `bits` 32-bit
// words. A word of width w (1, 2 or 4 bits) holds 16 / w pairs; pair slot i of it has
// its first element at bit w i and its second at bit 16 + w i:
//
//   4 bits   word s            = | . . . . p3 p2 p1 p0 | . . . . p3 p2 p1 p0 |   first elements low,
//   2 bits   word s / 2        = |  p7 ... p1 p0       |  p7 ... p1 p0       |   second elements in
//   1 bit    word 0            = |  p15 ...    p0      |  p15 ...    p0      |   the high half
//
// so that masking a word with ((2^w - 1) << w i) * 0x10001 drops both codes of a pair
// into the two 16-bit halves at once. Three bits are two planes: the low two bits of every
// code in a 2-bit layout (words 0 and 1) and the high bit in a 1-bit layout (word 2).
//
//   codes  u32 [row_tiles, col_tiles, bits, 32 lanes]   word w of lane l of tile (rt, kt);
//                                                       a warp's load of one word is 128
//                                                       contiguous bytes
//   params u32 [row_tiles, groups, 16 rows]             f16 scale | zero << 16, per row and group
//   salient u16 (f16) [row_tiles, k, 16 rows]           salient value j of the tile's 16 rows
//   salient_idx i32 [k]                                 as stored
//
// Exact dequantization. A code c (< 16) in the low mantissa bits of a 16-bit float whose
// bits are those of 1024 (f16) or 128 (bf16), where one unit in the last place is 1, reads
// as 1024 + c or 128 + c. Subtracting the same float built from the zero point z gives
// c - z exactly, in the activations' own type: the tensor core then multiplies exact
// integers by x, and the f16 scale multiplies the float32 sums of each group.
#pragma once

#include <cstdint>

#include "meswitch/cuda/host_device.hpp"

namespace meswitch::cuda::tile {

inline constexpr int kRows = 16;   // output rows of a tile: the M of one mma
inline constexpr int kCols = 64;   // input columns of a tile: four k-steps of 16
inline constexpr int kSteps = 4;
inline constexpr int kStepCols = 16;
inline constexpr int kLanes = 32;
inline constexpr int kPairs = 16;  // f16x2 pairs of codes per lane and tile
// Rows and columns of a delta the kernel takes are multiples of this; group sizes are
// multiples of kStepCols (or the whole row, itself a multiple of 64).
inline constexpr int kDimensionMultiple = 64;

// ---- the fragment of one lane -------------------------------------------------------

// Tile row of fragment register f of `lane`.
MESWITCH_HOST_DEVICE int fragment_row(int lane, int f) { return (lane >> 2) + 8 * (f & 1); }

// Tile column of element e (0, 1) of fragment register f of `lane` in k-step `step`.
MESWITCH_HOST_DEVICE int fragment_col(int lane, int step, int f, int e) {
  return kStepCols * step + 4 * (lane & 3) + 2 * (f >> 1) + e;
}

// The pair (0..15) of register f in step `step`, and back.
MESWITCH_HOST_DEVICE int pair_of(int step, int f) { return 4 * step + f; }
MESWITCH_HOST_DEVICE int step_of_pair(int pair) { return pair >> 2; }
MESWITCH_HOST_DEVICE int fragment_of_pair(int pair) { return pair & 3; }

// Who holds tile element (row, col): the inverse of fragment_row / fragment_col.
struct FragmentSlot {
  int lane, step, fragment, element;
};

MESWITCH_HOST_DEVICE FragmentSlot slot_of(int row, int col) {
  const int within = col % kStepCols;
  return {4 * (row % 8) + within / 4, col / kStepCols, (row / 8) | (((within % 4) / 2) << 1), within % 2};
}

// First of the four adjacent tile columns of the activations that `lane` feeds the mma in
// `step`: columns +0, +1 are B register 0 (k = 2t, 2t+1), +2, +3 register 1 (k = 2t+8, 2t+9).
MESWITCH_HOST_DEVICE int activation_col(int lane, int step) { return kStepCols * step + 4 * (lane & 3); }

// The token (B column, 0..7 within an n8 tile) whose activations `lane` loads.
MESWITCH_HOST_DEVICE int activation_token(int lane) { return lane >> 2; }

// Row and token (within the 16 x 8 tile) of accumulator element i (0..3) of `lane`.
MESWITCH_HOST_DEVICE int accumulator_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
MESWITCH_HOST_DEVICE int accumulator_token(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// ---- codes: planes, words and bits --------------------------------------------------

// A run of words holding one bit width of every code: `width` bits of each code, taken
// from code bit `code_shift` up, in words first_word, first_word + 1, ...
struct Plane {
  int width, first_word, code_shift;
};

MESWITCH_HOST_DEVICE int plane_count(int bits) { return bits == 3 ? 2 : 1; }

MESWITCH_HOST_DEVICE Plane plane_of(int bits, int index) {
  if (bits == 3) return index == 0 ? Plane{2, 0, 0} : Plane{1, 2, 2};
  return Plane{bits, 0, 0};
}

// Words per lane and tile: 32 codes of `bits` bits.
MESWITCH_HOST_DEVICE int words_per_lane(int bits) { return bits; }

MESWITCH_HOST_DEVICE int pairs_per_word(int width) { return 16 / width; }

// Word (of the lane's `bits` words) and bit of element e of pair p in `plane`.
MESWITCH_HOST_DEVICE int plane_word(Plane plane, int pair) { return plane.first_word + pair / pairs_per_word(plane.width); }
MESWITCH_HOST_DEVICE int plane_bit(Plane plane, int pair, int e) {
  return 16 * e + plane.width * (pair % pairs_per_word(plane.width));
}

// Mask of both elements of pair slot 0 of a word of `width` bits.
MESWITCH_HOST_DEVICE std::uint32_t pair_mask(int width) { return ((1u << width) - 1u) * 0x00010001u; }

// Index of word `word` of `lane` of tile (row_tile, col_tile) in the tiled code array.
MESWITCH_HOST_DEVICE std::int64_t code_word_index(std::int64_t row_tile, std::int64_t col_tile, std::int64_t col_tiles,
                                                  int bits, int word, int lane) {
  return ((row_tile * col_tiles + col_tile) * bits + word) * kLanes + lane;
}

// ---- scales, zero points, salient values ---------------------------------------------

MESWITCH_HOST_DEVICE std::int64_t param_index(std::int64_t row_tile, std::int64_t group, std::int64_t groups,
                                              int row_in_tile) {
  return (row_tile * groups + group) * kRows + row_in_tile;
}

MESWITCH_HOST_DEVICE std::uint32_t pack_param(std::uint16_t scale_f16, std::uint32_t zero) {
  return std::uint32_t(scale_f16) | (zero << 16);
}
MESWITCH_HOST_DEVICE std::uint16_t param_scale_f16(std::uint32_t param) { return std::uint16_t(param & 0xffffu); }
MESWITCH_HOST_DEVICE std::uint32_t param_zero(std::uint32_t param) { return param >> 16; }

MESWITCH_HOST_DEVICE std::int64_t salient_index(std::int64_t row_tile, std::int64_t j, std::int64_t k, int row_in_tile) {
  return (row_tile * k + j) * kRows + row_in_tile;
}

// Quantization group of k-step `step` of column tile `col_tile` (a step lies in one group).
MESWITCH_HOST_DEVICE std::int64_t group_of_step(std::int64_t col_tile, int step, std::int64_t group_size) {
  return (col_tile * kCols + kStepCols * step) / group_size;
}

// ---- exact dequantization -------------------------------------------------------------

// Bits of the 16-bit float whose last place is worth 1: 1024 in f16, 128 in bf16.
inline constexpr std::uint32_t kF16Magic = 0x6400u;
inline constexpr std::uint32_t kBf16Magic = 0x4300u;

// The two codes of `pair` as two 16-bit floats (magic + code each), from a lane's words.
template <int Bits>
MESWITCH_HOST_DEVICE std::uint32_t pair_as_floats(const std::uint32_t* lane_words, int pair, std::uint32_t magic) {
  static_assert(Bits >= 1 && Bits <= 4, "pair_as_floats: Bits must be 1..4");
  const std::uint32_t both = magic * 0x00010001u;
  if constexpr (Bits == 3) {
    // low two bits from the 2-bit plane, the high bit from the 1-bit plane moved to bit 2
    const std::uint32_t low = lane_words[pair / 8] >> (2 * (pair % 8));
    const std::uint32_t high = lane_words[2] >> pair;
    return (low & pair_mask(2)) | ((high & pair_mask(1)) << 2) | both;
  } else {
    constexpr int kPerWord = 16 / Bits;
    return ((lane_words[pair / kPerWord] >> (Bits * (pair % kPerWord))) & pair_mask(Bits)) | both;
  }
}

// The zero point as the same kind of float, in both halves: subtracting it from
// pair_as_floats leaves code - zero exactly.
MESWITCH_HOST_DEVICE std::uint32_t zero_as_floats(std::uint32_t zero, std::uint32_t magic) {
  return (magic + zero) * 0x00010001u;
}

}  // namespace meswitch::cuda::tile
