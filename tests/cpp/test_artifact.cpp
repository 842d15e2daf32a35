#include <catch2/catch.hpp>
#include <algorithm>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "meswitch/artifact.hpp"
#include "meswitch/sha256.hpp"
#include "test_support.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;
using meswitch_test::file_exists;
using meswitch_test::scratch_path;
using meswitch_test::write_bytes;

TEST_CASE("sha256 matches the FIPS 180-4 test vectors", "[sha256]") {
  REQUIRE(sha256_hex("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  REQUIRE(sha256_hex("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  REQUIRE(sha256_hex(two_blocks.data(), two_blocks.size()) ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // Fed in uneven pieces, the digest is the same.
  const std::string million(1000000, 'a');
  Sha256 pieces;
  for (std::size_t at = 0; at < million.size(); at += 997) pieces.update(million.data() + at, std::min<std::size_t>(997, million.size() - at));
  REQUIRE(pieces.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

namespace {

// Every field a reader checks, for the tensors write_small_artifact stores.
nlohmann::json small_manifest() {
  return {{"name", "unit"},
          {"base", {{"fingerprint", std::string(64, 'a')}, {"config_sha256", std::string(64, 'b')}, {"tensors", nlohmann::json::object()}}},
          {"expert_config", {{"model_type", "llama"}}},
          {"quantization",
           {{"bits", 2}, {"group_size", 8}, {"salient", 1}, {"clip_grid", 1}, {"min_clip", 0.5}, {"avg_bits", nullptr},
            {"vocab_bits", nullptr}, {"calibration", {{"kind", "weight-only"}}}}},
          {"statistics", {{"delta_parameters", 16}, {"delta_storage_bits", 112}, {"avg_bits", 7.0}}},
          {"tensors",
           {{"w", {{"kind", "delta"}, {"dtype", "F16"}, {"shape", {2, 8}}, {"rows", 2}, {"cols", 8}, {"bits", 2},
                   {"group_size", 8}, {"salient", 1}}},
            {"norm", {{"kind", "full"}, {"dtype", "F32"}, {"shape", {8}}}}}}};
}

// `zero` and `salient_column` let a test write a hostile artifact.
std::string write_small_artifact(const std::string& directory, std::uint64_t max_shard_bytes, std::uint8_t zero = 1,
                                 std::int32_t salient_column = 3) {
  ArtifactWriter writer(directory, max_shard_bytes);
  std::vector<std::uint32_t> qweight(2 * 1, 0xAAAAAAAAu);  // 2 rows, 8 cols at 2 bits = 1 word each
  std::vector<std::uint16_t> scales(2 * 1, 0x3c00), salient(2 * 1, 0x4000);
  std::vector<std::uint8_t> zeros(2 * 1, zero);
  std::vector<std::int32_t> salient_idx = {salient_column};
  std::vector<float> norm = {1, 2, 3, 4, 5, 6, 7, 8};
  writer.add_tensor("w.qweight", DType::U32, {2, 1}, qweight.data());
  writer.add_tensor("w.scales", DType::F16, {2, 1}, scales.data());
  writer.add_tensor("w.zeros", DType::U8, {2, 1}, zeros.data());
  writer.add_tensor("w.salient_idx", DType::I32, {1}, salient_idx.data());
  writer.add_tensor("w.salient", DType::F16, {2, 1}, salient.data());
  writer.add_tensor("norm.full", DType::F32, {8}, norm.data());
  const std::string config = scratch_path("config.json");
  write_bytes(config, "{\"model_type\": \"llama\"}");
  writer.add_file("expert/config.json", config);
  writer.commit(small_manifest());
  return directory;
}

}  // namespace

TEST_CASE("an artifact round trips through writer and reader", "[artifact]") {
  const std::string directory = write_small_artifact(scratch_path("unit.meswitch"), 16);  // forces several shards
  const ExpertArtifact artifact = ExpertArtifact::open(directory);
  REQUIRE(artifact.manifest()["format_version"] == kArtifactFormatVersion);
  REQUIRE(artifact.manifest()["shards"].size() > 1);
  const CompressedDelta delta = artifact.delta("w");
  REQUIRE(delta.rows == 2);
  REQUIRE(delta.qweight[1] == 0xAAAAAAAAu);
  REQUIRE(delta.salient_idx[0] == 3);
  REQUIRE(delta.owner != nullptr);  // the mapped shards stay alive with the delta
  REQUIRE(artifact.delta_extra_rows("w").data == nullptr);
  REQUIRE(artifact.kind("norm") == "full");
  REQUIRE(artifact.stored("norm.full").data_as<float>()[7] == 8.0f);
  REQUIRE(file_exists(directory + "/expert/config.json"));
  REQUIRE_THROWS_WITH(artifact.delta("norm"), Contains("not stored as a delta"));
  REQUIRE_THROWS_WITH(artifact.entry("ghost"), Contains("'ghost'"));
}

TEST_CASE("a delta whose pieces break the format is refused, naming the file and tensor", "[artifact]") {
  const std::string high_zero = write_small_artifact(scratch_path("high_zero.meswitch"), 1 << 20, /*zero=*/4);
  REQUIRE_THROWS_AS(ExpertArtifact::open(high_zero).delta("w"), FormatError);
  REQUIRE_THROWS_WITH(ExpertArtifact::open(high_zero).delta("w"),
                      Contains("high_zero.meswitch") && Contains("'w.zeros'") && Contains("zero point 4"));
  const std::string far_column = write_small_artifact(scratch_path("far_column.meswitch"), 1 << 20, 1, 8);
  REQUIRE_THROWS_WITH(ExpertArtifact::open(far_column).delta("w"),
                      Contains("far_column.meswitch") && Contains("'w.salient_idx'") && Contains("outside [0, 8)"));
}

TEST_CASE("a corrupted shard fails its checksum", "[artifact]") {
  const std::string directory = write_small_artifact(scratch_path("corrupt.meswitch"), 1 << 20);
  const std::string shard = directory + "/deltas-00001-of-00001.safetensors";
  {
    std::fstream stream(shard, std::ios::in | std::ios::out | std::ios::binary);
    stream.seekp(-1, std::ios::end);
    stream.put('\x7f');
  }
  REQUIRE_THROWS_WITH(ExpertArtifact::open(directory), Contains("sha256"));
  // Without checksums the byte still lands in a zero point, which the content rules refuse.
  REQUIRE_THROWS_WITH(ExpertArtifact::open(directory, /*verify_checksums=*/false), Contains("zero point 127"));
}

TEST_CASE("an abandoned writer leaves no artifact and no staging directory", "[artifact]") {
  const std::string directory = scratch_path("abandoned.meswitch");
  std::string staging;
  {
    ArtifactWriter writer(directory);
    staging = writer.staging_directory();
    std::vector<float> data(4, 1.0f);
    writer.add_tensor("x.full", DType::F32, {4}, data.data());
    REQUIRE(file_exists(staging));
  }
  REQUIRE_FALSE(file_exists(directory));
  REQUIRE_FALSE(file_exists(staging));
}

TEST_CASE("a manifest from a newer format version is refused", "[artifact]") {
  const std::string directory = write_small_artifact(scratch_path("future.meswitch"), 1 << 20);
  write_bytes(directory + "/manifest.json", R"({"format": "meswitch-expert", "format_version": 99, "shards": [], "tensors": {}})");
  REQUIRE_THROWS_WITH(ExpertArtifact::open(directory), Contains("unsupported format_version 99"));
  write_bytes(directory + "/manifest.json", R"({"format": "something-else"})");
  REQUIRE_THROWS_WITH(ExpertArtifact::open(directory), Contains("not a meswitch expert artifact"));
}

TEST_CASE("sha256 with the SHA extensions matches the portable kernel on every length", "[sha256]") {
  if (!sha256_kernel_supported(Sha256Kernel::ShaNi)) {
    WARN("SKIPPED: sha-ni: this CPU has no SHA extensions");
    return;
  }
  std::mt19937 random(7);
  std::string data(20000, '\0');
  for (char& byte : data) byte = char(random());
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 260; ++n) lengths.push_back(n);
  for (int i = 0; i < 40; ++i) lengths.push_back(random() % data.size());
  for (const std::size_t n : lengths) {
    INFO("length " << n);
    REQUIRE(sha256_hex(data.data(), n, Sha256Kernel::ShaNi) == sha256_hex(data.data(), n, Sha256Kernel::Portable));
  }
  // Fed in random pieces, still the same digest.
  Sha256 pieces(Sha256Kernel::ShaNi);
  for (std::size_t at = 0; at < data.size();) {
    const std::size_t take = std::min<std::size_t>(random() % 300, data.size() - at);
    pieces.update(data.data() + at, take);
    at += take;
  }
  REQUIRE(pieces.hex_digest() == sha256_hex(data.data(), data.size(), Sha256Kernel::Portable));
  REQUIRE(std::string(sha256_kernel_name()) == "sha-ni");
}

TEST_CASE("MappedFile::read hashes in the same pass and recycles only a buffer nobody else holds", "[mapped_file]") {
  std::mt19937 random(3);
  const auto random_file = [&](const std::string& name, std::size_t size) {
    std::string bytes(size, '\0');
    for (char& byte : bytes) byte = char(random());
    const std::string path = scratch_path(name);
    write_bytes(path, bytes);
    return std::make_pair(path, bytes);
  };
  const auto [large, large_bytes] = random_file("read_large.bin", (3u << 20) + 123);  // several pieces
  const auto [small, small_bytes] = random_file("read_small.bin", 5000);

  Sha256 hash;
  std::size_t seen = 0, pieces = 0;
  const std::uint8_t* first = nullptr;
  const auto read = MappedFile::read(large, [&](const std::uint8_t* data, std::size_t size) {
    if (first == nullptr) first = data;
    REQUIRE(data == first + seen);  // in order, each piece where it lands in the buffer
    hash.update(data, size);
    seen += size;
    ++pieces;
  });
  REQUIRE(first == read->data());
  REQUIRE(seen == large_bytes.size());
  REQUIRE(pieces > 1);
  REQUIRE(hash.hex_digest() == sha256_file(large));
  REQUIRE_FALSE(read->recycled());

  // A buffer only this test holds: its pages take the next file, grown or shrunk to it.
  std::shared_ptr<MappedFile> spare = MappedFile::read(small);
  const auto grown = MappedFile::read(large, {}, std::move(spare));
  REQUIRE(grown->recycled());
  REQUIRE(std::string(reinterpret_cast<const char*>(grown->data()), grown->size()) == large_bytes);
  std::shared_ptr<MappedFile> big_spare = MappedFile::read(large);
  const auto shrunk = MappedFile::read(small, {}, std::move(big_spare));
  REQUIRE(shrunk->recycled());
  REQUIRE(std::string(reinterpret_cast<const char*>(shrunk->data()), shrunk->size()) == small_bytes);

  // Still held elsewhere, or a mapping of a file rather than owned memory: not taken.
  const std::shared_ptr<MappedFile> held = MappedFile::read(small);
  const auto beside = MappedFile::read(large, {}, held);
  REQUIRE_FALSE(beside->recycled());
  REQUIRE(std::string(reinterpret_cast<const char*>(held->data()), held->size()) == small_bytes);
  const auto from_mapping = MappedFile::read(small, {}, MappedFile::open(large));
  REQUIRE_FALSE(from_mapping->recycled());
  REQUIRE(std::string(reinterpret_cast<const char*>(from_mapping->data()), from_mapping->size()) == small_bytes);
}
