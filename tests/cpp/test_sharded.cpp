#include <catch2/catch.hpp>
#include <fstream>
#include <vector>

#include "meswitch/sharded_safetensors.hpp"
#include "test_support.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;
using meswitch_test::scratch_path;
using meswitch_test::write_bytes;

namespace {

std::string make_sharded_directory(const std::string& name, bool drop_second_shard) {
  const std::string directory = scratch_path(name);
  ::mkdir(directory.c_str(), 0755);
  std::vector<float> a = {1, 2, 3}, b = {4, 5};
  write_safetensors(directory + "/model-00001-of-00002.safetensors", {{{"layer.0.weight", DType::F32, {3}}, a.data()}});
  if (!drop_second_shard)
    write_safetensors(directory + "/model-00002-of-00002.safetensors", {{{"layer.1.weight", DType::F32, {2}}, b.data()}});
  write_bytes(directory + "/model.safetensors.index.json",
              R"({"metadata": {"total_size": 20}, "weight_map": {
                    "layer.0.weight": "model-00001-of-00002.safetensors",
                    "layer.1.weight": "model-00002-of-00002.safetensors"}})");
  return directory;
}

}  // namespace

TEST_CASE("a sharded checkpoint lists every tensor and reads each from its shard", "[sharded]") {
  const std::string directory = make_sharded_directory("sharded_ok", false);
  const auto checkpoint = SafetensorsCheckpoint::open(directory);
  REQUIRE(checkpoint.names() == std::vector<std::string>{"layer.0.weight", "layer.1.weight"});
  REQUIRE(checkpoint.shard_paths().size() == 2);
  REQUIRE(checkpoint.read_f32("layer.1.weight") == std::vector<float>{4, 5});
  REQUIRE(checkpoint.index_metadata().at("total_size") == "20");
  const auto via_index = SafetensorsCheckpoint::open(directory + "/model.safetensors.index.json");
  REQUIRE(via_index.read_f32("layer.0.weight") == std::vector<float>{1, 2, 3});
}

TEST_CASE("a single-file directory and a bare file open the same way", "[sharded]") {
  const std::string directory = scratch_path("single");
  ::mkdir(directory.c_str(), 0755);
  std::vector<float> w = {7, 8};
  write_safetensors(directory + "/model.safetensors", {{{"w", DType::F32, {2}}, w.data()}});
  REQUIRE(SafetensorsCheckpoint::open(directory).read_f32("w") == w);
  REQUIRE(SafetensorsCheckpoint::open(directory + "/model.safetensors").names().size() == 1);
}

TEST_CASE("a shard named in the index but missing", "[sharded][errors]") {
  const std::string directory = make_sharded_directory("sharded_missing", true);
  try {
    SafetensorsCheckpoint::open(directory);
    FAIL("no error for a missing shard");
  } catch (const FormatError& error) {
    REQUIRE_THAT(error.what(), Contains("model.safetensors.index.json"));
    REQUIRE(error.tensor() == "layer.1.weight");
    REQUIRE_THAT(error.what(), Contains("missing"));
  }
}

TEST_CASE("an index naming a tensor its shard lacks", "[sharded][errors]") {
  const std::string directory = make_sharded_directory("sharded_absent", false);
  write_bytes(directory + "/model.safetensors.index.json",
              R"({"weight_map": {"ghost": "model-00001-of-00002.safetensors"}})");
  const auto checkpoint = SafetensorsCheckpoint::open(directory);
  REQUIRE_THROWS_WITH(checkpoint.view("ghost"), Contains("absent from the shard"));
}

TEST_CASE("a broken index", "[sharded][errors]") {
  const std::string directory = make_sharded_directory("sharded_broken", false);
  write_bytes(directory + "/model.safetensors.index.json", R"({"weight_map": [1, 2]})");
  REQUIRE_THROWS_AS(SafetensorsCheckpoint::open(directory), FormatError);
  write_bytes(directory + "/model.safetensors.index.json", R"({"weight_map": {"x": "../evil.safetensors"}})");
  REQUIRE_THROWS_WITH(SafetensorsCheckpoint::open(directory), Contains("plain file name"));
  const std::string empty = scratch_path("empty_dir");
  ::mkdir(empty.c_str(), 0755);
  REQUIRE_THROWS_WITH(SafetensorsCheckpoint::open(empty), Contains("neither"));
}
