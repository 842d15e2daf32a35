// The CUDA kernels' host-checkable core, without a GPU: the repack into the tile layout,
// its index arithmetic and the exact per-tile dequantization (cuda/tile_layout.hpp,
// cuda/tiled_delta.hpp) against the canonical layout and its reference dequantization
// (docs/format.md), bit for bit; the segment table's arithmetic (cuda/segments.hpp); and
// an emulation of the kernel's tile loop in which the tensor-core instruction is
// rebuilt from the PTX ISA's fragment tables, written out here independently of the
// layout's own functions, compared with the CPU reference delta_matmul.
//
// Tolerance of the emulation: |y - y_ref| <= 1e-5 * M + 1e-30 with M = sum_c |x_c| |w_c|
// + sum_j |x_idx_j S_j| (the magnitude of what is accumulated), as for the CPU kernels:
// the emulation sums in float32 in the kernel's order (per step, per group, per warp),
// the reference in double on the same 16-bit activations.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "meswitch/cpu/delta_gemm.hpp"
#include "meswitch/cuda/segments.hpp"
#include "meswitch/cuda/tile_layout.hpp"
#include "meswitch/cuda/tiled_delta.hpp"
#include "random_delta.hpp"

using namespace meswitch;
using meswitch_test::CanonicalDelta;
using meswitch_test::random_delta;
namespace tile = meswitch::cuda::tile;

namespace {

// The reference dequantization of docs/format.md, in float32.
float reference_dequant(const CanonicalDelta& d, std::int64_t r, std::int64_t c) {
  const std::size_t g = std::size_t(r * d.groups() + c / d.group);
  const std::uint32_t code = cpu::detail::code_at(d.qweight.data() + r * packed_words_per_row(d.cols, d.bits), d.bits, c);
  return (float(code) - float(d.zeros[g])) * f16_to_float(d.scales[g]);
}

float half_to_float(std::uint16_t bits, bool bf16) { return bf16 ? bf16_to_float(bits) : f16_to_float(bits); }

// Both halves of a packed pair of 16-bit floats minus another pair, as the kernel's
// packed subtract computes them (exactly: small integers).
void subtract_pairs(std::uint32_t value, std::uint32_t zero, bool bf16, float out[2]) {
  for (int e = 0; e < 2; ++e)
    out[e] = half_to_float(std::uint16_t(value >> (16 * e)), bf16) - half_to_float(std::uint16_t(zero >> (16 * e)), bf16);
}

std::uint32_t pair_as_floats(int bits, const std::uint32_t* words, int pair, std::uint32_t magic) {
  std::uint32_t result = 0;
  MESWITCH_DISPATCH_BITS(bits, BITS, { result = tile::pair_as_floats<BITS>(words, pair, magic); });
  return result;
}

struct TestShape {
  std::int64_t rows, cols, group, k;
};

// Shapes with every group size the kernel takes: steps of 16, ragged last groups (cols 192
// in groups of 80: 80, 80, 32; cols 320 in groups of 48), whole rows, k = 0 and k = cols.
const TestShape kShapes[] = {{64, 64, 64, 3},   {128, 192, 80, 7},  {64, 256, 16, 0},  {192, 128, 32, 128},
                         {64, 320, 48, 11}, {128, 512, 512, 5}, {64, 1024, 128, 20}};

}  // namespace

TEST_CASE("the lane fragments cover each tile element once and follow the PTX fragment table", "[cuda][tile]") {
  std::vector<int> seen(tile::kRows * tile::kCols, 0);
  for (int lane = 0; lane < tile::kLanes; ++lane)
    for (int step = 0; step < tile::kSteps; ++step)
      for (int f = 0; f < 4; ++f)
        for (int e = 0; e < 2; ++e) {
          const int row = tile::fragment_row(lane, f), col = tile::fragment_col(lane, step, f, e);
          REQUIRE(row >= 0);
          REQUIRE(row < tile::kRows);
          REQUIRE(col >= tile::kStepCols * step);  // a step stays within its 16 columns
          REQUIRE(col < tile::kStepCols * (step + 1));
          ++seen[std::size_t(row * tile::kCols + col)];
          const tile::FragmentSlot slot = tile::slot_of(row, col);
          REQUIRE(slot.lane == lane);
          REQUIRE(slot.step == step);
          REQUIRE(slot.fragment == f);
          REQUIRE(slot.element == e);
          // PTX: A element a_j (j = 2 f + e) of lane is at row groupID (+ 8 for j in 2,3,6,7).
          const int j = 2 * f + e;
          const int ptx_row = (lane >> 2) + ((j < 2 || (j >= 4 && j < 6)) ? 0 : 8);
          REQUIRE(row == ptx_row);
          // The B element this A element meets in the mma (same k) is fed by the lanes of
          // the same threadID_in_group, from the column the layout says.
          const int ptx_k = (lane % 4) * 2 + (j & 1) + (j >= 4 ? 8 : 0);
          const int b_register = ptx_k >= 8 ? 1 : 0, b_element = ptx_k & 1;
          REQUIRE(tile::activation_col(lane, step) + 2 * b_register + b_element == col);
        }
  REQUIRE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  for (int lane = 0; lane < tile::kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {  // PTX: c_i at row groupID (+ 8 for i >= 2), column 2 t + (i & 1)
      REQUIRE(tile::accumulator_row(lane, i) == (lane >> 2) + (i >= 2 ? 8 : 0));
      REQUIRE(tile::accumulator_token(lane, i) == (lane % 4) * 2 + (i & 1));
    }
}

TEST_CASE("repacking into the tile layout loses nothing, for bits 1-4 and every shape", "[cuda][tile]") {
  for (int bits = 1; bits <= 4; ++bits)
    for (const TestShape& shape : kShapes) {
      const CanonicalDelta d = random_delta(shape.rows, shape.cols, bits, shape.group, shape.k, unsigned(bits * 100 + shape.cols));
      const cuda::TiledDelta tiled = cuda::tile_delta(d.view());
      INFO("bits " << bits << " shape [" << shape.rows << ", " << shape.cols << "] group " << shape.group);
      REQUIRE(std::int64_t(tiled.codes.size()) == shape.rows * shape.cols * bits / 32);
      REQUIRE(tiled.codes.size() == d.qweight.size());  // the same bytes, rearranged
      REQUIRE(cuda::untile_codes(tiled) == d.codes);
      REQUIRE(tiled.salient_idx == d.salient_idx);
      for (std::int64_t r = 0; r < shape.rows; ++r) {
        for (std::int64_t g = 0; g < d.groups(); ++g) {
          const std::uint32_t param = tiled.params[std::size_t(tile::param_index(r / 16, g, d.groups(), int(r % 16)))];
          REQUIRE(tile::param_scale_f16(param) == d.scales[std::size_t(r * d.groups() + g)]);
          REQUIRE(tile::param_zero(param) == d.zeros[std::size_t(r * d.groups() + g)]);
        }
        for (std::int64_t j = 0; j < shape.k; ++j)
          REQUIRE(tiled.salient[std::size_t(tile::salient_index(r / 16, j, shape.k, int(r % 16)))] ==
                  d.salient[std::size_t(r * shape.k + j)]);
      }
    }
}

TEST_CASE("3-bit codes split into a 2-bit and a 1-bit plane", "[cuda][tile]") {
  // Lane 0, pair 0 (step 0, register 0) holds tile elements (0, 0) and (0, 1); pair 5
  // (step 1, register 1) holds (8, 16) and (8, 17).
  CanonicalDelta d = random_delta(64, 64, 3, 64, 0, 5);
  std::fill(d.codes.begin(), d.codes.end(), std::uint8_t(0));
  d.codes[0] = 5;             // 0b101: low plane 01, high plane 1
  d.codes[1] = 6;             // 0b110: low plane 10, high plane 1
  d.codes[8 * 64 + 16] = 3;   // 0b011
  d.codes[8 * 64 + 17] = 4;   // 0b100
  d.qweight = pack_codes(d.codes.data(), 64, 64, 3);
  const cuda::TiledDelta tiled = cuda::tile_delta(d.view());
  // Low plane (2 bits, 8 pairs a word): pair 0 at bits 0 / 16 and pair 5 at bits 10 / 26 of
  // word 0; word 1 (pairs 8..15) is empty. High plane (1 bit): pair 0 at bits 0 / 16, pair 5
  // at bits 5 / 21 of word 2. Words of one lane are 32 apart ([word][lane]).
  REQUIRE(tiled.codes[0] == (1u | (2u << 16) | (3u << 10)));
  REQUIRE(tiled.codes[32] == 0u);
  REQUIRE(tiled.codes[64] == (1u | (1u << 16) | (1u << 21)));
}

TEST_CASE("per-tile dequantization equals the reference dequantization bit for bit", "[cuda][tile]") {
  for (const bool bf16 : {false, true}) {
    const std::uint32_t magic = bf16 ? tile::kBf16Magic : tile::kF16Magic;
    for (int bits = 1; bits <= 4; ++bits)
      for (const TestShape& shape : kShapes) {
        const CanonicalDelta d = random_delta(shape.rows, shape.cols, bits, shape.group, shape.k, unsigned(7 * bits + shape.rows));
        const cuda::TiledDelta tiled = cuda::tile_delta(d.view());
        const std::int64_t col_tiles = shape.cols / tile::kCols, groups = d.groups();
        INFO((bf16 ? "bf16" : "f16") << " bits " << bits << " cols " << shape.cols << " group " << shape.group);
        for (std::int64_t rt = 0; rt < shape.rows / tile::kRows; ++rt)
          for (std::int64_t kt = 0; kt < col_tiles; ++kt)
            for (int lane = 0; lane < tile::kLanes; ++lane) {
              std::uint32_t words[4];
              for (int w = 0; w < bits; ++w)
                words[w] = tiled.codes[std::size_t(tile::code_word_index(rt, kt, col_tiles, bits, w, lane))];
              for (int pair = 0; pair < tile::kPairs; ++pair) {
                const int step = tile::step_of_pair(pair), f = tile::fragment_of_pair(pair);
                const int row_in_tile = tile::fragment_row(lane, f);
                const std::int64_t group = tile::group_of_step(kt, step, shape.group);
                const std::uint32_t param = tiled.params[std::size_t(tile::param_index(rt, group, groups, row_in_tile))];
                float integer[2];
                subtract_pairs(pair_as_floats(bits, words, pair, magic), tile::zero_as_floats(tile::param_zero(param), magic),
                               bf16, integer);
                const float scale = f16_to_float(tile::param_scale_f16(param));
                for (int e = 0; e < 2; ++e) {
                  const std::int64_t r = rt * tile::kRows + row_in_tile;
                  const std::int64_t c = kt * tile::kCols + tile::fragment_col(lane, step, f, e);
                  REQUIRE(integer[e] == std::trunc(integer[e]));  // an exact small integer
                  const float got = integer[e] * scale, expected = reference_dequant(d, r, c);
                  REQUIRE(float_bits(got) == float_bits(expected));
                }
              }
            }
      }
  }
}

TEST_CASE("deltas the kernels cannot take are refused with the reason", "[cuda][tile]") {
  REQUIRE_THROWS_WITH(cuda::check_tileable(100, 128, 2, 64, "w"), Catch::Contains("tensor 'w'") &&
                                                                      Catch::Contains("multiples of 64") &&
                                                                      Catch::Contains("[100, 128]"));
  REQUIRE_THROWS_WITH(cuda::check_tileable(128, 96, 2, 32, "w"), Catch::Contains("[128, 96]"));
  REQUIRE_THROWS_WITH(cuda::check_tileable(128, 128, 2, 24, "w"),
                      Catch::Contains("multiple of 16 or the whole row (128), got 24"));
  REQUIRE_THROWS_WITH(cuda::check_tileable(128, 128, 5, 32, "w"), Catch::Contains("1 to 4 bits"));
  REQUIRE_NOTHROW(cuda::check_tileable(128, 128, 2, 128, "w"));
  const CanonicalDelta d = random_delta(64, 100, 2, 20, 1, 3);
  REQUIRE_THROWS_AS(cuda::tile_delta(d.view()), FormatError);
}

TEST_CASE("segment tables: every token in its expert's items, ids past the last poisoned, -1 skipped", "[cuda][segments]") {
  std::mt19937 rng(11);
  for (const std::int64_t tokens : {0, 1, 7, 8, 9, 16, 17, 100, 1000})
    for (const int experts : {1, 3, 64}) {
      std::uniform_int_distribution<int> id(-1, experts);  // experts itself is out of range
      std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens));
      for (auto& value : ids) value = id(rng);
      const int per_block = cuda::tokens_per_block_for(tokens), buckets = experts + 1;
      std::vector<std::int32_t> counts(static_cast<std::size_t>(buckets), 0), starts(static_cast<std::size_t>(buckets + 1)),
          first_item(static_cast<std::size_t>(buckets + 1));
      for (std::int32_t value : ids)
        if (cuda::bucket_of(value, experts) >= 0) ++counts[std::size_t(cuda::bucket_of(value, experts))];
      cuda::scan_buckets(counts.data(), buckets, per_block, starts.data(), first_item.data());
      // order as the device builds it (any order within a bucket gives the same outputs)
      std::vector<std::int32_t> order(static_cast<std::size_t>(tokens), -1), cursor(starts.begin(), starts.end() - 1);
      for (std::int64_t t = 0; t < tokens; ++t) {
        const int bucket = cuda::bucket_of(ids[std::size_t(t)], experts);
        if (bucket >= 0) order[std::size_t(cursor[std::size_t(bucket)]++)] = std::int32_t(t);
      }
      std::vector<int> covered(static_cast<std::size_t>(tokens), 0);
      const std::int64_t capacity = cuda::work_item_capacity(tokens, experts);
      REQUIRE(first_item[std::size_t(buckets)] <= capacity);
      for (std::int64_t i = 0; i < capacity; ++i) {
        const cuda::WorkItem item = cuda::work_item_at(i, starts.data(), first_item.data(), buckets, per_block);
        INFO("tokens " << tokens << " experts " << experts << " item " << i);
        if (i >= first_item[std::size_t(buckets)]) {
          REQUIRE(item.expert == cuda::kNoItem);
          continue;
        }
        REQUIRE(item.count >= 1);
        REQUIRE(item.count <= per_block);
        for (std::int32_t entry = item.begin; entry < item.begin + item.count; ++entry) {
          const std::int32_t token = order[std::size_t(entry)];
          const std::int32_t expected = ids[std::size_t(token)] >= experts ? cuda::kPoisonItem : ids[std::size_t(token)];
          REQUIRE(item.expert == expected);
          ++covered[std::size_t(token)];
        }
      }
      for (std::int64_t t = 0; t < tokens; ++t) REQUIRE(covered[std::size_t(t)] == (ids[std::size_t(t)] >= 0 ? 1 : 0));
    }
  REQUIRE_THROWS_WITH(cuda::check_segment_sizes(10, 0), Catch::Contains("0 experts"));
  REQUIRE_THROWS_WITH(cuda::check_segment_sizes(4000000, 8), Catch::Contains("split the batch"));
}

namespace {

// One mma.m16n8k16 with float32 accumulation, rebuilt from the PTX ISA's fragment
// tables (not from tile_layout.hpp): d[lane][i] += sum_k A[row][k] B[k][n].
void emulate_mma(const float a[tile::kLanes][8], const float b[tile::kLanes][4], float d[tile::kLanes][4]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, thread = lane % 4;
    for (int j = 0; j < 8; ++j) {
      const int row = group + ((j < 2 || (j >= 4 && j < 6)) ? 0 : 8);
      const int col = thread * 2 + (j & 1) + (j >= 4 ? 8 : 0);
      A[row][col] = a[lane][j];
    }
    for (int j = 0; j < 4; ++j) B[thread * 2 + (j & 1) + (j >= 2 ? 8 : 0)][group] = b[lane][j];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, thread = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = thread * 2 + (i & 1);
      float sum = 0;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[lane][i] += sum;
    }
  }
}

constexpr int kEmulatedWarps = 8;  // as the kernel: warps of a block split the column tiles

// The kernel's tile loop for one block of up to 8 tokens (x_bits [tokens, cols], 16-bit
// floats), on the host, with the layout's functions and the mma above.
void emulate_kernel(const cuda::TiledDelta& tiled, const std::vector<std::uint16_t>& x_bits, bool bf16,
                    std::int64_t tokens, std::vector<float>& y) {
  const std::uint32_t magic = bf16 ? tile::kBf16Magic : tile::kF16Magic;
  const std::int64_t col_tiles = tiled.cols / tile::kCols, groups = tiled.groups(), cols = tiled.cols;
  y.assign(std::size_t(tokens * tiled.rows), 0.0f);
  for (std::int64_t token_block = 0; token_block < tokens; token_block += 8) {
    const std::int64_t block_tokens = std::min<std::int64_t>(8, tokens - token_block);
    for (std::int64_t rt = 0; rt < tiled.rows / tile::kRows; ++rt) {
      float partial[kEmulatedWarps][8][16] = {};  // [warp][token][row], the block's shared reduction
      for (int warp = 0; warp < kEmulatedWarps; ++warp) {
        float acc[32][4] = {}, part[32][4] = {}, scale[32][2] = {};
        std::uint32_t zero[32][2] = {};
        std::int64_t current_group = -1;
        const auto flush = [&] {
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i) {
              acc[lane][i] += scale[lane][i >> 1] * part[lane][i];
              part[lane][i] = 0;
            }
        };
        for (std::int64_t kt = warp; kt < col_tiles; kt += kEmulatedWarps)
          for (int step = 0; step < tile::kSteps; ++step) {
            const std::int64_t group = tile::group_of_step(kt, step, tiled.group_size);
            if (group != current_group) {
              flush();
              for (int lane = 0; lane < 32; ++lane)
                for (int half = 0; half < 2; ++half) {
                  const std::uint32_t param =
                      tiled.params[std::size_t(tile::param_index(rt, group, groups, tile::fragment_row(lane, half)))];
                  scale[lane][half] = f16_to_float(tile::param_scale_f16(param));
                  zero[lane][half] = tile::zero_as_floats(tile::param_zero(param), magic);
                }
              current_group = group;
            }
            float a[32][8], b[32][4];
            for (int lane = 0; lane < 32; ++lane) {
              std::uint32_t words[4];
              for (int w = 0; w < tiled.bits; ++w)
                words[w] = tiled.codes[std::size_t(tile::code_word_index(rt, kt, col_tiles, tiled.bits, w, lane))];
              for (int f = 0; f < 4; ++f)
                subtract_pairs(pair_as_floats(tiled.bits, words, tile::pair_of(step, f), magic), zero[lane][f & 1], bf16,
                               &a[lane][2 * f]);
              const std::int64_t token = token_block + tile::activation_token(lane);
              for (int j = 0; j < 4; ++j)
                b[lane][j] = token < token_block + block_tokens
                                 ? half_to_float(x_bits[std::size_t(token * cols + kt * tile::kCols +
                                                                    tile::activation_col(lane, step) + j)], bf16)
                                 : 0.0f;
            }
            emulate_mma(a, b, part);
          }
        flush();
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i)
            partial[warp][tile::accumulator_token(lane, i)][tile::accumulator_row(lane, i)] = acc[lane][i];
      }
      for (std::int64_t n = 0; n < block_tokens; ++n)
        for (int r = 0; r < tile::kRows; ++r) {
          float sum = 0;
          for (int warp = 0; warp < kEmulatedWarps; ++warp) sum += partial[warp][n][r];
          for (std::int64_t j = 0; j < tiled.k; ++j)
            sum += f16_to_float(tiled.salient[std::size_t(tile::salient_index(rt, j, tiled.k, r))]) *
                   half_to_float(x_bits[std::size_t((token_block + n) * cols + tiled.salient_idx[std::size_t(j)])], bf16);
          y[std::size_t((token_block + n) * tiled.rows + rt * tile::kRows + r)] += sum;
        }
    }
  }
}

}  // namespace

TEST_CASE("the kernel's tile loop, emulated with the PTX fragment tables, matches delta_matmul", "[cuda][tile]") {
  const TestShape shapes[] = {{64, 64, 64, 2}, {128, 192, 80, 7}, {64, 1024, 16, 9}, {128, 640, 640, 3}, {64, 512, 48, 0}};
  for (const bool bf16 : {false, true})
    for (int bits = 1; bits <= 4; ++bits)
      for (const TestShape& shape : shapes)
        for (const std::int64_t tokens : {1, 5, 11}) {
          const CanonicalDelta d = random_delta(shape.rows, shape.cols, bits, shape.group, shape.k, unsigned(31 * bits + tokens));
          const cuda::TiledDelta tiled = cuda::tile_delta(d.view());
          std::mt19937 rng(unsigned(tokens * 7 + bits));
          std::normal_distribution<float> normal(0.0f, 1.0f);
          std::vector<std::uint16_t> x_bits(std::size_t(tokens * shape.cols));
          for (auto& value : x_bits) value = bf16 ? float_to_bf16(normal(rng)) : float_to_f16(normal(rng));
          std::vector<float> emulated;
          emulate_kernel(tiled, x_bits, bf16, tokens, emulated);

          std::vector<float> expected(std::size_t(tokens * shape.rows), 0.0f);
          const TensorView x(x_bits.data(), bf16 ? DType::BF16 : DType::F16, Shape{tokens, shape.cols});
          cpu::KernelOptions reference;
          reference.path = cpu::CpuPath::Reference;
          cpu::delta_matmul(d.view(), x, expected.data(), shape.rows, reference);
          INFO((bf16 ? "bf16" : "f16") << " bits " << bits << " [" << shape.rows << ", " << shape.cols << "] group "
                                       << shape.group << " k " << shape.k << " tokens " << tokens);
          for (std::int64_t t = 0; t < tokens; ++t)
            for (std::int64_t r = 0; r < shape.rows; ++r) {
              double magnitude = 0;
              for (std::int64_t c = 0; c < shape.cols; ++c)
                magnitude += std::fabs(double(half_to_float(x_bits[std::size_t(t * shape.cols + c)], bf16)) *
                                       double(reference_dequant(d, r, c)));
              for (std::int64_t j = 0; j < shape.k; ++j)
                magnitude += std::fabs(double(half_to_float(x_bits[std::size_t(t * shape.cols + d.salient_idx[std::size_t(j)])], bf16)) *
                                       double(f16_to_float(d.salient[std::size_t(r * shape.k + j)])));
              const std::size_t at = std::size_t(t * shape.rows + r);
              REQUIRE(std::fabs(double(emulated[at]) - double(expected[at])) <= 1e-5 * magnitude + 1e-30);
            }
        }
}
