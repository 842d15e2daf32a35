#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <vector>

#include "meswitch/pack.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;

namespace {

// The layout spelled out bit by bit: code j occupies stream bits [j*bits, j*bits+bits).
std::vector<std::uint32_t> pack_bit_by_bit(const std::vector<std::uint8_t>& codes, std::int64_t rows, std::int64_t cols,
                                           int bits) {
  const std::int64_t words_per_row = packed_words_per_row(cols, bits);
  std::vector<std::uint32_t> words(std::size_t(rows * words_per_row), 0u);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < cols; ++j)
      for (int b = 0; b < bits; ++b) {
        const std::int64_t bit = j * bits + b;
        if ((codes[std::size_t(r * cols + j)] >> b) & 1u)
          words[std::size_t(r * words_per_row + bit / 32)] |= 1u << (bit % 32);
      }
  return words;
}

}  // namespace

TEST_CASE("pack and unpack round trip for every bit width and ragged widths", "[pack]") {
  std::mt19937 generator(7);
  for (int bits = 1; bits <= 4; ++bits) {
    for (std::int64_t cols : {1, 7, 31, 33, 100, 257}) {
      const std::int64_t rows = 3;
      std::vector<std::uint8_t> codes(static_cast<std::size_t>(rows * cols));
      for (auto& code : codes) code = std::uint8_t(generator() % (1u << bits));
      const std::vector<std::uint32_t> words = pack_codes(codes.data(), rows, cols, bits);
      REQUIRE(std::int64_t(words.size()) == rows * ((cols * bits + 31) / 32));
      REQUIRE(words == pack_bit_by_bit(codes, rows, cols, bits));
      REQUIRE(unpack_codes(words.data(), rows, cols, bits) == codes);
    }
  }
}

TEST_CASE("packed words follow the little-endian bitstream layout", "[pack]") {
  // 2 bits: codes 1 2 3 0 ... -> 0b00'11'10'01 in the low byte.
  const std::vector<std::uint8_t> two = {1, 2, 3, 0};
  REQUIRE(pack_codes(two.data(), 1, 4, 2) == std::vector<std::uint32_t>{0x39u});
  // 4 bits: nibbles in order, first code in the lowest nibble.
  const std::vector<std::uint8_t> four = {1, 2, 3, 4, 5, 6, 7, 8, 15};
  REQUIRE(pack_codes(four.data(), 1, 9, 4) == std::vector<std::uint32_t>{0x87654321u, 0xfu});
  // 1 bit: 33 ones fill one word and spill one bit into the next; the tail stays zero.
  const std::vector<std::uint8_t> ones(33, 1);
  REQUIRE(pack_codes(ones.data(), 1, 33, 1) == std::vector<std::uint32_t>{0xffffffffu, 0x1u});
  // 3 bits: code 10 straddles words 0 and 1 (stream bits 30..32).
  std::vector<std::uint8_t> three(12, 0);
  three[10] = 7;
  REQUIRE(pack_codes(three.data(), 1, 12, 3) == std::vector<std::uint32_t>{0xc0000000u, 0x1u});
  three[10] = 0;
  three[11] = 5;  // stream bits 33..35
  REQUIRE(pack_codes(three.data(), 1, 12, 3) == std::vector<std::uint32_t>{0x0u, 0xau});
}

TEST_CASE("each row of packed codes starts on a fresh word", "[pack]") {
  const std::vector<std::uint8_t> codes = {1, 1, 1, 1, 1, 1};  // 2 rows of 3 codes at 3 bits
  REQUIRE(pack_codes(codes.data(), 2, 3, 3) == std::vector<std::uint32_t>{0x49u, 0x49u});
}

TEST_CASE("packing rejects unsupported bit widths and codes that do not fit", "[pack]") {
  const std::vector<std::uint8_t> codes = {0, 1, 4};
  REQUIRE_THROWS_AS(pack_codes(codes.data(), 1, 3, 0), Error);
  REQUIRE_THROWS_AS(pack_codes(codes.data(), 1, 3, 5), Error);
  REQUIRE_THROWS_WITH(pack_codes(codes.data(), 1, 3, 2, "layers.0.q_proj"),
                      Contains("layers.0.q_proj") && Contains("(0, 2)") && Contains("2 bits"));
  std::vector<std::uint32_t> words(1, 0u);
  REQUIRE_THROWS_AS(unpack_codes(words.data(), 1, 3, 7), Error);
}

TEST_CASE("bit dispatch for packing yields a compile-time constant", "[pack]") {
  for (int bits = 1; bits <= 4; ++bits) {
    int seen = 0;
    MESWITCH_DISPATCH_BITS(bits, BITS, {
      static_assert(BITS >= 1 && BITS <= 4, "BITS is a constant");
      seen = BITS;
    });
    REQUIRE(seen == bits);
  }
  REQUIRE_THROWS_WITH(MESWITCH_DISPATCH_BITS(5, BITS, { (void)BITS; }), Contains("5"));
}
