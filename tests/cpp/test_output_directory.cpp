#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <sstream>
#include <string>

#include "meswitch/output_directory.hpp"
#include "test_support.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;
using meswitch_test::file_exists;
using meswitch_test::scratch_path;
using meswitch_test::write_bytes;

namespace {

std::string read(const std::string& path) {
  std::ifstream stream(path);
  std::stringstream text;
  text << stream.rdbuf();
  return text.str();
}

std::string make_output(const std::string& path, const std::string& payload) {
  ::mkdir(path.c_str(), 0755);
  write_bytes(path + "/manifest.json", R"({"format": "meswitch-expert"})");
  write_bytes(path + "/payload", payload);
  return path;
}

}  // namespace

TEST_CASE("an output path that is not ours to replace is refused", "[output]") {
  const std::string user = scratch_path("user_dir");
  ::mkdir(user.c_str(), 0755);
  write_bytes(user + "/notes.txt", "keep me");
  REQUIRE_THROWS_WITH(check_output_directory(user, kArtifactMarker, true), Contains("is not a meswitch artifact"));
  REQUIRE_THROWS_WITH(check_output_directory(".", kArtifactMarker, true), Contains("current directory"));
  REQUIRE_THROWS_WITH(check_output_directory("/", kArtifactMarker, true), Contains("root directory"));
  const std::string file = scratch_path("plain_file");
  write_bytes(file, "x");
  REQUIRE_THROWS_WITH(check_output_directory(file, kArtifactMarker, true), Contains("is not a directory"));
  // An input, or a directory above it, spelled any way.
  REQUIRE_THROWS_WITH(check_output_directory(user + "/../" + user.substr(user.rfind('/') + 1), kArtifactMarker, true,
                                             {{"the expert", user}}),
                      Contains("is the expert"));
  REQUIRE_THROWS_WITH(check_output_directory(MESWITCH_TEST_TMP, kArtifactMarker, true, {{"the expert", user}}),
                      Contains("or one of its parents"));
  REQUIRE(read(user + "/notes.txt") == "keep me");

  const std::string artifact = make_output(scratch_path("earlier.meswitch"), "old");
  REQUIRE_THROWS_WITH(check_output_directory(artifact, kArtifactMarker, false), Contains("pass --force"));
  REQUIRE_NOTHROW(check_output_directory(artifact, kArtifactMarker, true));
  REQUIRE_THROWS_WITH(check_output_directory(artifact, kDecompressedMarker, true),
                      Contains("is not a model written by meswitch decompress"));
  REQUIRE_NOTHROW(check_output_directory(scratch_path("not_there_yet"), kArtifactMarker, false));
}

TEST_CASE("commit_directory swaps a complete directory into place and removes the old one", "[output]") {
  const std::string target = make_output(scratch_path("swap.meswitch"), "old");
  const std::string staging = make_output(scratch_path("swap.meswitch.tmp.1"), "new");
  commit_directory(staging, target);
  REQUIRE(read(target + "/payload") == "new");
  REQUIRE_FALSE(file_exists(staging));

  const std::string fresh = scratch_path("fresh.meswitch");
  commit_directory(make_output(scratch_path("fresh.meswitch.tmp.1"), "first"), fresh);
  REQUIRE(read(fresh + "/payload") == "first");
}

TEST_CASE("removing a replaced output never follows its links", "[output]") {
  const std::string outside = scratch_path("outside_file");
  write_bytes(outside, "precious");
  const std::string target = make_output(scratch_path("linked.meswitch"), "old");
  REQUIRE(::symlink(outside.c_str(), (target + "/link").c_str()) == 0);
  commit_directory(make_output(scratch_path("linked.meswitch.tmp.1"), "new"), target);
  REQUIRE(read(outside) == "precious");
  REQUIRE(read(target + "/payload") == "new");
}
