#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "meswitch/safetensors.hpp"
#include "test_support.hpp"

using namespace meswitch;
using meswitch_test::file_exists;
using meswitch_test::scratch_path;

TEST_CASE("written files read back bit-exact and aligned with metadata", "[safetensors]") {
  const std::string path = scratch_path("roundtrip.safetensors");
  std::vector<float> weights(6 * 5);
  std::iota(weights.begin(), weights.end(), -3.0f);
  std::vector<std::uint16_t> halves = {0x3c00, 0x7bff, 0x0001, 0x8000, 0x7e00};
  std::vector<std::uint8_t> bytes = {1, 2, 3};
  std::vector<std::int32_t> indices = {5, -1, 7};
  write_safetensors(path,
                    {{{"b.bytes", DType::U8, {3}}, bytes.data()},
                     {{"a.weight", DType::F32, {6, 5}}, weights.data()},
                     {{"c.half", DType::F16, {5}}, halves.data()},
                     {{"d.index", DType::I32, {3}}, indices.data()},
                     {{"e.empty", DType::BF16, {0, 4}}, nullptr}},
                    {{"format", "pt"}, {"note", "round trip"}});

  const SafetensorsFile file = SafetensorsFile::open(path);
  REQUIRE(file.tensors().size() == 5);
  REQUIRE(file.metadata().at("note") == "round trip");
  const TensorView view = file.view("a.weight");
  REQUIRE(view.shape == Shape{6, 5});
  REQUIRE(SafetensorsFile::is_aligned(view));
  REQUIRE(std::memcmp(view.data, weights.data(), weights.size() * 4) == 0);
  REQUIRE(std::memcmp(file.view("c.half").data, halves.data(), halves.size() * 2) == 0);
  REQUIRE(std::memcmp(file.view("b.bytes").data, bytes.data(), 3) == 0);
  REQUIRE(std::memcmp(file.view("d.index").data, indices.data(), 12) == 0);
  REQUIRE(file.info("e.empty").nbytes() == 0);
  REQUIRE(file.read_f32("a.weight") == weights);
  REQUIRE(file.read_f32("c.half")[1] == 65504.0f);
  // Header padded to 8 bytes and the largest dtype first: the data buffer starts 8-aligned.
  REQUIRE((static_cast<const std::uint8_t*>(view.data) - file.mapping()->data()) % 8 == 0);
  for (const auto& tensor : file.tensors()) {
    REQUIRE(tensor.begin % dtype_size(tensor.dtype) == 0);
  }
  REQUIRE_THROWS_AS(file.view("missing"), FormatError);
}

TEST_CASE("the streaming writer checks order and sizes and leaves nothing on failure", "[safetensors]") {
  const std::string path = scratch_path("stream.safetensors");
  std::vector<float> one(4, 1.0f), two(2, 2.0f);
  {
    SafetensorsWriter writer(path, {{"x", DType::F32, {4}}, {"y", DType::F32, {2}}});
    REQUIRE_THROWS_AS(writer.write("y", two.data(), 8), FormatError);  // out of order
    REQUIRE_THROWS_AS(writer.write("x", one.data(), 12), FormatError);  // wrong size
    REQUIRE_THROWS_AS(writer.write("z", one.data(), 16), FormatError);  // undeclared
    writer.write("x", one.data(), 16);
    REQUIRE_THROWS_AS(writer.commit(), FormatError);  // y never written
  }
  REQUIRE_FALSE(file_exists(path));  // abandoned writer: no file at all
  REQUIRE(meswitch_test::temporary_files_left() == 0);

  {
    SafetensorsWriter writer(path, {{"x", DType::F32, {4}}, {"y", DType::F32, {2}}});
    writer.write("x", one.data(), 16);
    writer.write("y", two.data(), 8);
    writer.commit();
  }
  REQUIRE(SafetensorsFile::open(path).read_f32("y") == two);
  REQUIRE_THROWS_AS(SafetensorsWriter(path, {{"x", DType::F32, {1}}, {"x", DType::F32, {1}}}), FormatError);
}

TEST_CASE("an existing file is replaced atomically", "[safetensors]") {
  const std::string path = scratch_path("replace.safetensors");
  std::vector<float> first(3, 1.0f), second(5, 2.0f);
  write_safetensors(path, {{{"w", DType::F32, {3}}, first.data()}});
  const SafetensorsFile before = SafetensorsFile::open(path);  // keeps the old mapping
  write_safetensors(path, {{{"w", DType::F32, {5}}, second.data()}});
  REQUIRE(before.read_f32("w") == first);  // readers of the old file are unaffected
  REQUIRE(SafetensorsFile::open(path).read_f32("w") == second);
}
