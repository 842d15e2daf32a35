// Every kind of malformed file is a FormatError naming the file (and the tensor when
// there is one), never a crash: one test case per defect.
#include <catch2/catch.hpp>
#include <string>

#include "meswitch/safetensors.hpp"
#include "test_support.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;
using meswitch_test::safetensors_bytes;
using meswitch_test::scratch_path;
using meswitch_test::write_bytes;

namespace {

const std::string kGoodHeader =
    R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}})";

// Writes `bytes` to a scratch file and returns the error message opening it produces.
std::string open_error(const std::string& name, const std::string& bytes) {
  const std::string path = scratch_path(name);
  write_bytes(path, bytes);
  try {
    SafetensorsFile::open(path);
  } catch (const FormatError& error) {
    REQUIRE(error.file() == path);
    return error.what();
  }
  FAIL("opening " << name << " did not throw FormatError");
  return {};
}

}  // namespace

TEST_CASE("a well-formed hand-built file opens", "[safetensors][errors]") {
  const std::string path = scratch_path("good.safetensors");
  write_bytes(path, safetensors_bytes(kGoodHeader, 24));
  REQUIRE(SafetensorsFile::open(path).tensors().size() == 2);
}

TEST_CASE("truncated file: shorter than the length prefix", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("tiny.safetensors", "abc"), Contains("too short"));
}

TEST_CASE("truncated file: data cut short", "[safetensors][errors]") {
  const std::string message = open_error("cut.safetensors", safetensors_bytes(kGoodHeader, 20));
  REQUIRE_THAT(message, Contains("'b'"));
  REQUIRE_THAT(message, Contains("past the data buffer"));
}

TEST_CASE("header length past end of file", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("long.safetensors", safetensors_bytes(kGoodHeader, 24, 100000)),
               Contains("runs past the end of the file"));
}

TEST_CASE("header length above the cap", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("huge.safetensors", safetensors_bytes(kGoodHeader, 24, 1ull << 40)),
               Contains("exceeds"));
}

TEST_CASE("overlapping offsets", "[safetensors][errors]") {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[8,16]}})";
  const std::string message = open_error("overlap.safetensors", safetensors_bytes(header, 16));
  REQUIRE_THAT(message, Contains("overlap"));
  REQUIRE_THAT(message, Contains("'b'"));
}

TEST_CASE("out-of-range offsets", "[safetensors][errors]") {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}})";
  REQUIRE_THAT(open_error("range.safetensors", safetensors_bytes(header, 16)), Contains("past the data buffer"));
}

TEST_CASE("a gap between tensors", "[safetensors][errors]") {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[24,32]}})";
  REQUIRE_THAT(open_error("gap.safetensors", safetensors_bytes(header, 32)), Contains("gap"));
}

TEST_CASE("trailing bytes after the last tensor", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("trailing.safetensors", safetensors_bytes(kGoodHeader, 40)), Contains("trailing"));
}

TEST_CASE("unknown dtype", "[safetensors][errors]") {
  const std::string header = R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})";
  const std::string message = open_error("dtype.safetensors", safetensors_bytes(header, 16));
  REQUIRE_THAT(message, Contains("'a'"));
  REQUIRE_THAT(message, Contains("unsupported dtype 'F64'"));
}

TEST_CASE("shape and byte length disagree", "[safetensors][errors]") {
  const std::string header = R"({"a":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}})";
  const std::string message = open_error("shape.safetensors", safetensors_bytes(header, 16));
  REQUIRE_THAT(message, Contains("needs 24 bytes"));
}

TEST_CASE("negative or non-integer dimensions", "[safetensors][errors]") {
  const std::string negative = R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})";
  REQUIRE_THAT(open_error("negative.safetensors", safetensors_bytes(negative, 4)), Contains("non-integer"));
  const std::string fractional = R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})";
  REQUIRE_THAT(open_error("fraction.safetensors", safetensors_bytes(fractional, 4)), Contains("non-integer"));
}

TEST_CASE("a shape whose byte count overflows 64 bits", "[safetensors][errors]") {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})";
  REQUIRE_THAT(open_error("overflow.safetensors", safetensors_bytes(header, 4)), Contains("overflows"));
}

TEST_CASE("invalid JSON", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("json.safetensors", safetensors_bytes(R"({"a": {"dtype": )", 0)),
               Contains("not valid JSON"));
}

TEST_CASE("header that is JSON but not an object of tensors", "[safetensors][errors]") {
  REQUIRE_THAT(open_error("array.safetensors", safetensors_bytes("[1, 2]", 0)), Contains("JSON object"));
  REQUIRE_THAT(open_error("entry.safetensors", safetensors_bytes(R"({"a": 3})", 0)), Contains("'a'"));
  REQUIRE_THAT(open_error("meta.safetensors", safetensors_bytes(R"({"__metadata__": {"k": 1}})", 0)),
               Contains("not a string"));
  REQUIRE_THAT(open_error("offsets.safetensors",
                          safetensors_bytes(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1)),
               Contains("data_offsets"));
}

TEST_CASE("the header parser works on memory for fuzzing", "[safetensors][errors]") {
  const std::string bytes = safetensors_bytes(kGoodHeader, 24);
  const auto* data = reinterpret_cast<const std::uint8_t*>(bytes.data());
  REQUIRE(parse_safetensors_header(data, bytes.size(), bytes.size(), "buffer").tensors.size() == 2);
  REQUIRE_THROWS_AS(parse_safetensors_header(data, 4, 4, "buffer"), FormatError);
}
