// CompressedDelta::validate and over_views: every rule fires, naming the stored tensor
// and the field at fault, so the reader, the kernels and the bindings refuse bad pieces
// before any kernel indexes with them.
#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/quantize.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;

namespace {

// A valid 2-bit delta [3, 100] in groups of 32 (the last group of 4 columns is ragged)
// with salient columns {5, 40}, as plain arrays the tests then break one at a time.
struct Pieces {
  std::int64_t rows = 3, cols = 100, group_size = 32;
  int bits = 2;
  std::vector<std::uint32_t> qweight = std::vector<std::uint32_t>(3 * 7, 0x55555555u);  // ceil(100 * 2 / 32) = 7
  std::vector<std::uint16_t> scales = std::vector<std::uint16_t>(3 * 4, 0x3c00);         // 4 groups
  std::vector<std::uint8_t> zeros = std::vector<std::uint8_t>(3 * 4, 1);
  std::vector<std::int32_t> salient_idx = {5, 40};
  std::vector<std::uint16_t> salient = std::vector<std::uint16_t>(3 * 2, 0x4000);

  CompressedDelta over(DeltaChecks checks = DeltaChecks::Contents, std::int64_t scale_groups = 4,
                       std::int64_t words = 7) const {
    return CompressedDelta::over_views(
        "mlp.up", rows, cols, bits, group_size, -1,
        TensorView(const_cast<std::uint32_t*>(qweight.data()), DType::U32, {rows, words}),
        TensorView(const_cast<std::uint16_t*>(scales.data()), DType::F16, {rows, scale_groups}),
        TensorView(const_cast<std::uint8_t*>(zeros.data()), DType::U8, {rows, scale_groups}),
        TensorView(const_cast<std::int32_t*>(salient_idx.data()), DType::I32, {std::int64_t(salient_idx.size())}),
        TensorView(const_cast<std::uint16_t*>(salient.data()), DType::F16, {rows, std::int64_t(salient_idx.size())}),
        checks);
  }
};

}  // namespace

TEST_CASE("a compressed delta derives its sizes and tensor names from its layout", "[compressed_delta]") {
  const Pieces pieces;
  const CompressedDelta delta = pieces.over();
  REQUIRE(delta.words_per_row() == 7);
  REQUIRE(delta.groups() == 4);
  REQUIRE(delta.k == 2);
  REQUIRE(delta.expected_shape(DeltaPiece::qweight) == Shape{3, 7});
  REQUIRE(delta.expected_shape(DeltaPiece::salient) == Shape{3, 2});
  REQUIRE(delta.tensor_name(DeltaPiece::salient_idx) == "mlp.up.salient_idx");
  REQUIRE(delta_piece_dtype(DeltaPiece::zeros) == DType::U8);
  REQUIRE(delta.view(DeltaPiece::scales).shape == Shape{3, 4});
  REQUIRE(delta.owner == nullptr);  // borrowed
  std::vector<float> dense(std::size_t(3 * 100));
  dequantize_delta(delta, dense.data());
  REQUIRE(dense[5] == 2.0f);   // code 1 - zero 1, plus the salient value 2
  REQUIRE(dense[6] == 0.0f);
}

TEST_CASE("every validation rule fires with the tensor and field in its message", "[compressed_delta]") {
  SECTION("zero points must be below 2^bits") {
    Pieces pieces;
    pieces.zeros[2 * 4 + 3] = 4;
    REQUIRE_THROWS_AS(pieces.over(), FormatError);
    REQUIRE_THROWS_WITH(pieces.over(), Contains("mlp.up.zeros") && Contains("zero point 4") &&
                                           Contains("(row 2, group 3)") && Contains("2^2"));
    REQUIRE_NOTHROW(pieces.over(DeltaChecks::Layout));  // the per-call kernel check does not scan them
  }
  SECTION("qweight must have the words per row of its bits") {
    const Pieces pieces;
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Contents, 4, 6),
                        Contains("mlp.up.qweight") && Contains("[3, 6]") && Contains("7 words per row expected"));
  }
  SECTION("scales and zeros must have the groups of the group size") {
    const Pieces pieces;  // 100 columns in groups of 32: 4 groups, the last ragged
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Contents, 3),
                        Contains("mlp.up.scales") && Contains("[3, 3]") && Contains("expected [3, 4]") &&
                            Contains("group size 32"));
  }
  SECTION("the group size must be within [1, cols]") {
    Pieces pieces;
    pieces.group_size = 101;
    REQUIRE_THROWS_WITH(pieces.over(), Contains("mlp.up") && Contains("group size 101"));
  }
  SECTION("bits must be 1..4") {
    Pieces pieces;
    pieces.bits = 5;
    REQUIRE_THROWS_WITH(pieces.over(), Contains("mlp.up") && Contains("bits must be 1..4"));
  }
  SECTION("salient_idx must be strictly ascending within [0, cols)") {
    Pieces pieces;
    pieces.salient_idx = {40, 5};
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Layout),
                        Contains("mlp.up.salient_idx") && Contains("salient_idx[1] = 5 is below"));
    pieces.salient_idx = {5, 5};
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Layout), Contains("mlp.up.salient_idx") && Contains("repeats"));
    pieces.salient_idx = {5, 100};
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Layout),
                        Contains("mlp.up.salient_idx") && Contains("salient_idx[1] = 100 is outside [0, 100)"));
    pieces.salient_idx = {-1, 5};
    REQUIRE_THROWS_WITH(pieces.over(DeltaChecks::Layout), Contains("salient_idx[0] = -1"));
  }
  SECTION("scales and salient values must be finite") {
    Pieces pieces;
    pieces.scales[5] = 0x7c00;  // +inf
    REQUIRE_THROWS_WITH(pieces.over(), Contains("mlp.up.scales") && Contains("(row 1, group 1)") &&
                                           Contains("not finite"));
    pieces.scales[5] = 0x3c00;
    pieces.salient[3] = 0x7e00;  // NaN
    REQUIRE_THROWS_WITH(pieces.over(), Contains("mlp.up.salient") && Contains("(row 1, channel 1)"));
  }
  SECTION("dtypes, ranks and contiguity are the stored ones") {
    const Pieces pieces;
    std::vector<float> wide(3 * 4);
    REQUIRE_THROWS_WITH(
        CompressedDelta::over_views("mlp.up", 3, 100, 2, 32, -1, TensorView(const_cast<std::uint32_t*>(pieces.qweight.data()), DType::U32, {3, 7}),
                                    TensorView(wide.data(), DType::F32, {3, 4}),
                                    TensorView(const_cast<std::uint8_t*>(pieces.zeros.data()), DType::U8, {3, 4}),
                                    TensorView(const_cast<std::int32_t*>(pieces.salient_idx.data()), DType::I32, {2}),
                                    TensorView(const_cast<std::uint16_t*>(pieces.salient.data()), DType::F16, {3, 2})),
        Contains("mlp.up.scales") && Contains("scales must be F16, got F32"));
    REQUIRE_THROWS_WITH(
        CompressedDelta::over_views("mlp.up", 3, 100, 2, 32, -1, TensorView(const_cast<std::uint32_t*>(pieces.qweight.data()), DType::U32, {3, 7}),
                                    TensorView(const_cast<std::uint16_t*>(pieces.scales.data()), DType::F16, {3, 4}, {1, 3}),
                                    TensorView(const_cast<std::uint8_t*>(pieces.zeros.data()), DType::U8, {3, 4}),
                                    TensorView(const_cast<std::int32_t*>(pieces.salient_idx.data()), DType::I32, {2}),
                                    TensorView(const_cast<std::uint16_t*>(pieces.salient.data()), DType::F16, {3, 2})),
        Contains("mlp.up.scales") && Contains("contiguous"));
  }
  SECTION("a missing array is refused before it is read") {
    CompressedDelta delta = Pieces().over();
    delta.zeros = nullptr;
    REQUIRE_THROWS_WITH(delta.validate(DeltaChecks::Layout), Contains("mlp.up.zeros") && Contains("no data"));
  }
}
