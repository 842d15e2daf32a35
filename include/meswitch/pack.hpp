// Canonical bit packing: the artifact's on-disk layout of low-bit codes.
//
// One row of `cols` codes of `bits` bits is a single little-endian bitstream:
//
//   code j  -> stream bits [j*bits, j*bits + bits)
//   stream bit i -> bit (i % 32) of u32 word (i / 32)
//
//   bits=3, cols=12:  word 0 = c0 | c1<<3 | ... | c9<<27 | (c10 & 3)<<30
//                     word 1 = (c10 >> 2) | c11<<1 | 0...      (code 10 straddles)
//
// Every row starts on a fresh word (packed_words_per_row = ceil(cols*bits/32)) and
// unused tail bits are zero, so a row is addressable on its own and two packings of
// the same codes are byte-identical (the artifact's checksums stay meaningful).
// The layout is deliberately kernel-neutral: kernels repack it into their tile
// layout at load time, the file stays simple enough for a NumPy reader.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/dispatch.hpp"
#include "meswitch/error.hpp"

namespace meswitch {

inline std::int64_t packed_words_per_row(std::int64_t cols, int bits) { return (cols * bits + 31) / 32; }

// Codes must be < 2^Bits; higher bits are dropped (pack_codes checks them first).
// A 64-bit accumulator lets a code straddle two words without a branch per code.
template <int Bits>
void pack_row(const std::uint8_t* codes, std::int64_t cols, std::uint32_t* words) {
  static_assert(Bits >= 1 && Bits <= 8, "pack_row: Bits must be 1..8");
  constexpr std::uint64_t mask = (1u << Bits) - 1u;
  std::uint64_t buffer = 0;
  int filled = 0;
  for (std::int64_t j = 0; j < cols; ++j) {
    buffer |= (codes[j] & mask) << filled;
    filled += Bits;
    if (filled >= 32) {
      *words++ = std::uint32_t(buffer);
      buffer >>= 32;
      filled -= 32;
    }
  }
  if (filled > 0) *words = std::uint32_t(buffer);  // tail bits stay zero
}

// Exact inverse of pack_row; reads exactly packed_words_per_row(cols, Bits) words.
template <int Bits>
void unpack_row(const std::uint32_t* words, std::int64_t cols, std::uint8_t* codes) {
  static_assert(Bits >= 1 && Bits <= 8, "unpack_row: Bits must be 1..8");
  constexpr std::uint64_t mask = (1u << Bits) - 1u;
  std::int64_t j = 0;
  if constexpr (32 % Bits == 0) {  // whole codes per word: independent shifts the compiler unrolls
    constexpr int per_word = 32 / Bits;
    for (; j + per_word <= cols; j += per_word) {
      const std::uint32_t word = *words++;
      for (int i = 0; i < per_word; ++i) codes[j + i] = std::uint8_t((word >> (i * Bits)) & mask);
    }
  }
  std::uint64_t buffer = 0;
  int available = 0;
  for (; j < cols; ++j) {
    if (available < Bits) {
      buffer |= std::uint64_t(*words++) << available;
      available += 32;
    }
    codes[j] = std::uint8_t(buffer & mask);
    buffer >>= Bits;
    available -= Bits;
  }
}

// Packs codes [rows, cols] (row-major) into words [rows, packed_words_per_row].
// A code that does not fit in `bits` is a FormatError naming `tensor` and its (row, col).
inline std::vector<std::uint32_t> pack_codes(const std::uint8_t* codes, std::int64_t rows, std::int64_t cols, int bits,
                                             const std::string& tensor = "") {
  if (rows < 0 || cols < 0)
    throw Error("tensor '" + tensor + "': cannot pack a negative shape [" + std::to_string(rows) + ", " +
                std::to_string(cols) + "]");
  const std::int64_t words_per_row = packed_words_per_row(cols, bits);
  std::vector<std::uint32_t> words(std::size_t(rows * words_per_row), 0u);
  MESWITCH_DISPATCH_BITS(bits, BITS, {
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::uint8_t* row = codes + r * cols;
      for (std::int64_t j = 0; j < cols; ++j)
        if (row[j] >> BITS)
          throw FormatError("", tensor,
                            "code " + std::to_string(int(row[j])) + " at (" + std::to_string(r) + ", " +
                                std::to_string(j) + ") does not fit in " + std::to_string(BITS) + " bits");
      pack_row<BITS>(row, cols, words.data() + r * words_per_row);
    }
  });
  return words;
}

// Unpacks words [rows, packed_words_per_row(cols, bits)] into codes [rows, cols].
inline std::vector<std::uint8_t> unpack_codes(const std::uint32_t* words, std::int64_t rows, std::int64_t cols,
                                              int bits) {
  if (rows < 0 || cols < 0)
    throw Error("cannot unpack a negative shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
  const std::int64_t words_per_row = packed_words_per_row(cols, bits);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(rows * cols));
  MESWITCH_DISPATCH_BITS(bits, BITS, {
    for (std::int64_t r = 0; r < rows; ++r) unpack_row<BITS>(words + r * words_per_row, cols, codes.data() + r * cols);
  });
  return codes;
}

}  // namespace meswitch
