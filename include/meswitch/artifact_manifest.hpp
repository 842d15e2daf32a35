// manifest.json of a compressed-expert artifact, parsed and checked completely
// before anything else is read (spec: docs/format.md).
//
// An artifact may come from anywhere, so every field is checked for its type and
// range here, once: a reader never meets a missing key, a string where a number
// belongs, a truncated integer (4294967297 is not 1), a shard or side-file name that
// leaves the directory, or a tensor entry of an unknown kind. Errors are FormatError
// naming the manifest file, the tensor when there is one, and the field.
// Checks that need the stored tensors (shapes, dtypes, codes) run in
// ExpertArtifact::open once the shards are mapped.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

constexpr int kArtifactFormatVersion = 2;
constexpr const char* kArtifactFormatName = "meswitch-expert";

// A small file of the expert (config.json, tokenizer ...) carried in the artifact.
struct ArtifactSideFile {
  std::string path;    // "expert/NAME", NAME a plain file name
  std::string sha256;  // of the file's bytes, lowercase hex
  std::uint64_t bytes = 0;
};

struct ArtifactShard {
  std::string file;  // plain file name inside the artifact directory
  std::string sha256;
  std::vector<std::string> tensors;
};

struct ArtifactManifest {
  nlohmann::json json;  // the whole manifest, optional tensor fields filled in
  std::vector<ArtifactShard> shards;
  std::vector<ArtifactSideFile> files;
};

namespace detail {

// Field access that names the file, tensor and field in every error.
class ManifestFields {
 public:
  explicit ManifestFields(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& tensor, const std::string& problem) const {
    throw FormatError(file_, tensor, problem);
  }

  const nlohmann::json& member(const nlohmann::json& object, const std::string& key, const std::string& tensor,
                               const std::string& where) const {
    const auto found = object.find(key);
    if (found == object.end()) fail(tensor, "field '" + where + key + "' is missing");
    return *found;
  }

  const nlohmann::json& object(const nlohmann::json& parent, const std::string& key, const std::string& tensor = "",
                               const std::string& where = "") const {
    const nlohmann::json& value = member(parent, key, tensor, where);
    if (!value.is_object()) fail(tensor, "field '" + where + key + "' must be an object, got " + kind(value));
    return value;
  }

  const nlohmann::json& array(const nlohmann::json& parent, const std::string& key, const std::string& tensor = "",
                              const std::string& where = "") const {
    const nlohmann::json& value = member(parent, key, tensor, where);
    if (!value.is_array()) fail(tensor, "field '" + where + key + "' must be an array, got " + kind(value));
    return value;
  }

  std::string string(const nlohmann::json& parent, const std::string& key, const std::string& tensor = "",
                     const std::string& where = "") const {
    const nlohmann::json& value = member(parent, key, tensor, where);
    if (!value.is_string()) fail(tensor, "field '" + where + key + "' must be a string, got " + kind(value));
    return value.get<std::string>();
  }

  // An integer in [low, high]; floats, booleans and out-of-range values are refused, never truncated.
  std::int64_t integer(const nlohmann::json& parent, const std::string& key, std::int64_t low, std::int64_t high,
                       const std::string& tensor = "", const std::string& where = "") const {
    return integer_value(member(parent, key, tensor, where), where + key, low, high, tensor);
  }

  std::int64_t integer_value(const nlohmann::json& value, const std::string& field, std::int64_t low,
                             std::int64_t high, const std::string& tensor) const {
    const std::string range = " in [" + std::to_string(low) + ", " + std::to_string(high) + "]";
    bool ok = false;
    std::int64_t result = 0;
    if (value.is_number_unsigned()) {
      const std::uint64_t raw = value.get<std::uint64_t>();
      ok = raw <= std::uint64_t(std::numeric_limits<std::int64_t>::max());
      result = ok ? std::int64_t(raw) : 0;
    } else if (value.is_number_integer()) {
      result = value.get<std::int64_t>();
      ok = true;
    }
    if (!ok || result < low || result > high)
      fail(tensor, "field '" + field + "' must be an integer" + range + ", got " + value.dump());
    return result;
  }

  void number(const nlohmann::json& parent, const std::string& key, bool nullable, const std::string& tensor = "",
              const std::string& where = "") const {
    const nlohmann::json& value = member(parent, key, tensor, where);
    if (!(value.is_number() || (nullable && value.is_null())))
      fail(tensor, "field '" + where + key + "' must be a number" + (nullable ? " or null" : "") + ", got " + kind(value));
  }

  static std::string kind(const nlohmann::json& value) {
    const std::string text = value.dump();
    return std::string(value.type_name()) + " " + (text.size() > 40 ? text.substr(0, 40) + "..." : text);
  }

 private:
  std::string file_;
};

inline bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

inline bool is_sha256_hex(const std::string& text) {
  if (text.size() != 64) return false;
  for (const char c : text)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

constexpr std::int64_t kMaxDimension = std::int64_t(1) << 40;

inline Shape parse_shape(const ManifestFields& fields, const nlohmann::json& entry, const std::string& tensor) {
  const nlohmann::json& shape = fields.array(entry, "shape", tensor);
  if (shape.size() > 8)
    fields.fail(tensor, "field 'shape' has " + std::to_string(shape.size()) + " dimensions (at most 8)");
  Shape result;
  long double elements = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    result.push_back(fields.integer_value(shape[i], "shape[" + std::to_string(i) + "]", 0, kMaxDimension, tensor));
    elements *= (long double)result.back();
  }
  if (elements > (long double)kMaxDimension) fields.fail(tensor, "field 'shape' " + shape.dump() + " is too large");
  return result;
}

inline void check_tensor_entry(const ManifestFields& fields, nlohmann::json& entry, const std::string& tensor) {
  if (!entry.is_object()) fields.fail(tensor, "entry must be an object, got " + ManifestFields::kind(entry));
  const std::string kind = fields.string(entry, "kind", tensor);
  const std::string dtype_text = fields.string(entry, "dtype", tensor);
  DType dtype{};
  if (!parse_dtype(dtype_text, dtype)) fields.fail(tensor, "field 'dtype': unknown dtype '" + dtype_text + "'");
  const Shape shape = parse_shape(fields, entry, tensor);
  if (kind == "same") return;
  if (kind == "full") {
    if (entry.contains("bytes")) fields.integer(entry, "bytes", 0, std::numeric_limits<std::int64_t>::max(), tensor);
    return;
  }
  if (kind != "delta") fields.fail(tensor, "field 'kind' must be 'same', 'full' or 'delta', got '" + kind + "'");
  if (!is_floating(dtype)) fields.fail(tensor, "field 'dtype': a delta needs a floating dtype, got " + dtype_text);
  if (shape.size() != 2) fields.fail(tensor, "field 'shape': a delta is a matrix, got " + shape_string(shape));
  const std::int64_t rows = fields.integer(entry, "rows", 1, kMaxDimension, tensor);
  const std::int64_t cols = fields.integer(entry, "cols", 1, kMaxDimension, tensor);
  fields.integer(entry, "bits", 1, 4, tensor);
  fields.integer(entry, "group_size", 1, cols, tensor);
  fields.integer(entry, "salient", 0, cols, tensor);
  if (!entry.contains("extra_rows")) entry["extra_rows"] = 0;  // optional: an expanded vocabulary only
  const std::int64_t extra = fields.integer(entry, "extra_rows", 0, kMaxDimension, tensor);
  if (shape[0] != rows + extra || shape[1] != cols)
    fields.fail(tensor, "field 'shape' " + shape_string(shape) + " does not match rows + extra_rows = " +
                            std::to_string(rows + extra) + " and cols = " + std::to_string(cols));
  if (entry.contains("role")) fields.string(entry, "role", tensor);
  for (const char* key : {"error", "relative_error"})
    if (entry.contains(key)) fields.number(entry, key, false, tensor);
  if (entry.contains("storage_bits"))
    fields.integer(entry, "storage_bits", 0, std::numeric_limits<std::int64_t>::max(), tensor);
}

inline void check_quantization(const ManifestFields& fields, const nlohmann::json& manifest) {
  const nlohmann::json& quantization = fields.object(manifest, "quantization");
  const std::string where = "quantization.";
  fields.integer(quantization, "bits", 1, 4, "", where);
  fields.integer(quantization, "group_size", 0, kMaxDimension, "", where);
  fields.integer(quantization, "clip_grid", 1, 1 << 20, "", where);
  fields.number(quantization, "min_clip", false, "", where);
  fields.number(quantization, "avg_bits", true, "", where);
  if (!fields.member(quantization, "vocab_bits", "", where).is_null())
    fields.integer(quantization, "vocab_bits", 1, 4, "", where);
  fields.string(fields.object(quantization, "calibration", "", where), "kind", "", where + "calibration.");
  if (quantization.contains("refine") && !quantization["refine"].is_null()) {
    const nlohmann::json& refine = fields.object(quantization, "refine", "", where);
    fields.integer(refine, "steps", 1, std::numeric_limits<std::int32_t>::max(), "", where + "refine.");
    fields.integer(refine, "texts", 0, std::numeric_limits<std::int32_t>::max(), "", where + "refine.");
    for (const char* key : {"kl_before", "kl_after"}) fields.number(refine, key, false, "", where + "refine.");
  }
}

}  // namespace detail

// Parses and checks manifest.json's text; `file` names it in errors.
inline ArtifactManifest parse_artifact_manifest(const std::string& text, const std::string& file) {
  const detail::ManifestFields fields(file);
  ArtifactManifest result;
  result.json = nlohmann::json::parse(text, nullptr, false);
  nlohmann::json& manifest = result.json;
  if (manifest.is_discarded() || !manifest.is_object()) fields.fail("", "manifest is not a valid JSON object");
  if (!manifest.contains("format") || manifest["format"] != kArtifactFormatName)
    fields.fail("", "not a meswitch expert artifact (field 'format' is not '" + std::string(kArtifactFormatName) + "')");
  const nlohmann::json& version = fields.member(manifest, "format_version", "", "");
  if (!(version.is_number_integer() || version.is_number_unsigned()) || version != kArtifactFormatVersion) {
    const bool older = version.is_number_integer() && version.get<std::int64_t>() >= 1 &&
                       version.get<std::int64_t>() < kArtifactFormatVersion;
    fields.fail("", "unsupported format_version " + version.dump() + " (this build reads version " +
                        std::to_string(kArtifactFormatVersion) +
                        (older ? "; older artifacts carry no side-file checksums: compress the expert again)" : ")"));
  }
  fields.string(manifest, "name");
  for (const char* key : {"domain", "created_by", "base_path_hint"})
    if (manifest.contains(key)) fields.string(manifest, key);

  const nlohmann::json& base = fields.object(manifest, "base");
  if (!detail::is_sha256_hex(fields.string(base, "fingerprint", "", "base.")))
    fields.fail("", "field 'base.fingerprint' is not a sha256 hex digest");
  fields.string(base, "config_sha256", "", "base.");
  for (const auto& item : fields.object(base, "tensors", "", "base.").items())
    if (!item.value().is_string()) fields.fail(item.key(), "field 'base.tensors' entry must be a string");
  fields.object(manifest, "expert_config");
  detail::check_quantization(fields, manifest);
  const nlohmann::json& statistics = fields.object(manifest, "statistics");
  fields.integer(statistics, "delta_parameters", 0, std::numeric_limits<std::int64_t>::max(), "", "statistics.");
  fields.integer(statistics, "delta_storage_bits", 0, std::numeric_limits<std::int64_t>::max(), "", "statistics.");
  fields.number(statistics, "avg_bits", false, "", "statistics.");

  fields.object(manifest, "tensors");
  for (auto& item : manifest["tensors"].items()) detail::check_tensor_entry(fields, item.value(), item.key());

  std::set<std::string> shard_files, stored;
  for (const nlohmann::json& shard : fields.array(manifest, "shards")) {
    if (!shard.is_object()) fields.fail("", "field 'shards' holds a " + std::string(shard.type_name()) + ", not an object");
    ArtifactShard entry;
    entry.file = fields.string(shard, "file", "", "shards[].");
    if (!detail::is_plain_file_name(entry.file))
      fields.fail("", "shard file '" + entry.file + "' must be a plain file name inside the artifact");
    if (!shard_files.insert(entry.file).second) fields.fail("", "shard file '" + entry.file + "' is listed twice");
    entry.sha256 = fields.string(shard, "sha256", "", "shards[].");
    if (!detail::is_sha256_hex(entry.sha256)) fields.fail("", "shard '" + entry.file + "': sha256 is not a hex digest");
    for (const nlohmann::json& name : fields.array(shard, "tensors", "", "shards[].")) {
      if (!name.is_string()) fields.fail("", "shard '" + entry.file + "': field 'tensors' holds a non-string");
      if (!stored.insert(name.get<std::string>()).second)
        fields.fail(name.get<std::string>(), "listed in more than one shard");
      entry.tensors.push_back(name.get<std::string>());
    }
    result.shards.push_back(std::move(entry));
  }

  std::set<std::string> side_names;
  for (const nlohmann::json& file_entry : fields.array(manifest, "files")) {
    if (!file_entry.is_object()) fields.fail("", "field 'files' holds a " + std::string(file_entry.type_name()) + ", not an object");
    ArtifactSideFile side;
    side.path = fields.string(file_entry, "path", "", "files[].");
    const std::string prefix = "expert/";
    if (side.path.compare(0, prefix.size(), prefix) != 0 || !detail::is_plain_file_name(side.path.substr(prefix.size())))
      fields.fail("", "side file '" + side.path + "' must be named expert/NAME with NAME a plain file name");
    if (!side_names.insert(side.path).second) fields.fail("", "side file '" + side.path + "' is listed twice");
    side.sha256 = fields.string(file_entry, "sha256", "", "files[].");
    if (!detail::is_sha256_hex(side.sha256)) fields.fail("", "side file '" + side.path + "': sha256 is not a hex digest");
    side.bytes = std::uint64_t(fields.integer(file_entry, "bytes", 0, std::int64_t(1) << 32, "", "files[]."));
    result.files.push_back(std::move(side));
  }
  return result;
}

}  // namespace meswitch
