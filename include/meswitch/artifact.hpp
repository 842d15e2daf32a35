// The compressed-expert artifact: a directory NAME.meswitch/ holding
//
//   manifest.json                        format version, expert and base identity,
//                                        quantization settings, per-tensor entries,
//                                        sha256 of every shard (spec: docs/format.md)
//   deltas-0000i-of-0000N.safetensors    the tensors, readable by any safetensors reader
//   expert/                              the expert's config.json, tokenizer files, ...
//
// Per weight W of kind "delta" the shards hold W.qweight (U32 [rows, words]),
// W.scales (F16 [rows, groups]), W.zeros (U8 [rows, groups]), W.salient_idx
// (I32 [k]), W.salient (F16 [rows, k]) and, for an expanded vocabulary,
// W.extra_rows (F16 [extra, cols]). Kind "full" stores W.full whole; kind "same"
// stores nothing (the tensor equals the base's).
//
// Writing stages everything in a temporary sibling directory and renames it into
// place on commit, so an interrupted compression leaves no artifact behind.
#pragma once

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "meswitch/compressed_delta.hpp"
#include "meswitch/error.hpp"
#include "meswitch/safetensors.hpp"
#include "meswitch/sha256.hpp"
#include "meswitch/sharded_safetensors.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

constexpr int kArtifactFormatVersion = 1;
constexpr const char* kArtifactFormatName = "meswitch-expert";

namespace detail {

inline std::string read_text_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) throw IoError("cannot open '" + path + "'");
  std::stringstream buffer;
  buffer << stream.rdbuf();
  return buffer.str();
}

inline void remove_tree(const std::string& path) {
  if (DIR* directory = ::opendir(path.c_str())) {
    while (dirent* entry = ::readdir(directory)) {
      const std::string name = entry->d_name;
      if (name == "." || name == "..") continue;
      const std::string child = path + "/" + name;
      struct stat info {};
      if (::lstat(child.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) remove_tree(child);
      else ::unlink(child.c_str());
    }
    ::closedir(directory);
  }
  ::rmdir(path.c_str());
}

inline std::string shard_file_name(std::size_t index, std::size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "deltas-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

}  // namespace detail

// Fingerprint of a base checkpoint: config hash plus dtype, shape and a content hash
// of every tensor. An artifact records it; loading against another base is refused.
inline nlohmann::json base_fingerprint(const SafetensorsCheckpoint& base, const std::string& config_text) {
  nlohmann::json tensors = nlohmann::json::object();
  Sha256 combined;
  for (const std::string& name : base.names()) {
    const TensorInfo& info = base.info(name);
    const TensorView view = base.view(name);
    const std::string entry = std::string(dtype_name(info.dtype)) + " " + shape_string(info.shape) + " " +
                              sha256_hex(view.data, info.nbytes());
    tensors[name] = entry;
    base.release(name);  // hashing streams through the whole base: keep only one tensor resident
    combined.update(name.data(), name.size());
    combined.update(entry.data(), entry.size());
  }
  return {{"config_sha256", sha256_hex(config_text.data(), config_text.size())},
          {"tensors", tensors},
          {"fingerprint", combined.hex_digest()}};
}

class ArtifactWriter {
 public:
  // `max_shard_bytes` bounds the memory held before a shard is flushed to disk.
  explicit ArtifactWriter(std::string directory, std::uint64_t max_shard_bytes = 128ull << 20)
      : directory_(strip_slash(std::move(directory))), max_shard_bytes_(max_shard_bytes) {
    std::vector<char> pattern(directory_.begin(), directory_.end());
    const char suffix[] = ".tmp.XXXXXX";
    pattern.insert(pattern.end(), suffix, suffix + sizeof suffix);
    if (::mkdtemp(pattern.data()) == nullptr)
      throw IoError("cannot create a staging directory beside '" + directory_ + "'");
    staging_ = pattern.data();
  }

  ~ArtifactWriter() {
    if (!committed_) detail::remove_tree(staging_);
  }
  ArtifactWriter(const ArtifactWriter&) = delete;
  ArtifactWriter& operator=(const ArtifactWriter&) = delete;

  // Queues one tensor (bytes copied); flushes a shard when the queue is large enough.
  void add_tensor(const std::string& name, DType dtype, const Shape& shape, const void* data) {
    if (!names_.insert(name).second) throw FormatError(directory_, name, "added twice to the artifact");
    Pending pending{{name, dtype, shape}, {}};
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    pending.bytes.assign(bytes, bytes + pending.spec.nbytes());
    pending_bytes_ += pending.bytes.size();
    pending_.push_back(std::move(pending));
    if (pending_bytes_ >= max_shard_bytes_) flush();
  }

  // Copies a small side file (config.json, tokenizer ...) into the artifact.
  void add_file(const std::string& relative_path, const std::string& source_path) {
    if (relative_path.empty() || relative_path.find("..") != std::string::npos || relative_path[0] == '/')
      throw Error("artifact side file name '" + relative_path + "' must be a plain relative path");
    const std::string text = detail::read_text_file(source_path);
    std::string target = staging_;
    std::size_t start = 0;
    for (std::size_t slash; (slash = relative_path.find('/', start)) != std::string::npos; start = slash + 1) {
      target += "/" + relative_path.substr(start, slash - start);
      ::mkdir(target.c_str(), 0755);
    }
    AtomicFileWriter file(staging_ + "/" + relative_path);
    file.write(text.data(), text.size());
    file.commit();
  }

  // Writes the last shard and manifest.json (with "format", "format_version" and
  // "shards" filled in), then moves the artifact into place, replacing an old one.
  void commit(nlohmann::json manifest) {
    flush();
    nlohmann::json shards = nlohmann::json::array();
    for (std::size_t i = 0; i < shard_count_; ++i) {
      const std::string final_name = detail::shard_file_name(i, shard_count_);
      const std::string final_path = staging_ + "/" + final_name;
      if (::rename(staging_shard(i).c_str(), final_path.c_str()) != 0)
        throw IoError("cannot rename shard into '" + final_path + "'");
      std::vector<std::string> tensors = shard_tensors_[i];
      shards.push_back({{"file", final_name}, {"sha256", sha256_file(final_path)}, {"tensors", tensors}});
    }
    manifest["format"] = kArtifactFormatName;
    manifest["format_version"] = kArtifactFormatVersion;
    manifest["shards"] = shards;
    const std::string text = manifest.dump(2) + "\n";
    AtomicFileWriter manifest_file(staging_ + "/manifest.json");
    manifest_file.write(text.data(), text.size());
    manifest_file.commit();

    // Replace an existing artifact: move it aside first so the rename cannot fail on a non-empty directory.
    std::string old_aside;
    struct stat info {};
    if (::stat(directory_.c_str(), &info) == 0) {
      old_aside = staging_ + ".old";
      if (::rename(directory_.c_str(), old_aside.c_str()) != 0)
        throw IoError("cannot move the existing '" + directory_ + "' aside");
    }
    if (::rename(staging_.c_str(), directory_.c_str()) != 0) {
      if (!old_aside.empty()) ::rename(old_aside.c_str(), directory_.c_str());
      throw IoError("cannot move the artifact into '" + directory_ + "'");
    }
    committed_ = true;
    if (!old_aside.empty()) detail::remove_tree(old_aside);
  }

  // Discards everything written so far (also what the destructor does when not committed).
  void abort() {
    if (committed_) return;
    detail::remove_tree(staging_);
    pending_.clear();
    pending_bytes_ = 0;
  }

  const std::string& staging_directory() const { return staging_; }

 private:
  struct Pending {
    TensorSpec spec;
    std::vector<std::uint8_t> bytes;
  };

  static std::string strip_slash(std::string path) {
    while (path.size() > 1 && path.back() == '/') path.pop_back();
    return path;
  }

  std::string staging_shard(std::size_t index) const {
    return staging_ + "/shard-" + std::to_string(index) + ".partial";
  }

  void flush() {
    if (pending_.empty()) return;
    std::vector<TensorSpec> specs;
    std::vector<std::string> names;
    std::map<std::string, const Pending*> by_name;
    for (const Pending& pending : pending_) {
      specs.push_back(pending.spec);
      names.push_back(pending.spec.name);
      by_name[pending.spec.name] = &pending;
    }
    SafetensorsWriter writer(staging_shard(shard_count_), std::move(specs), {{"format", "meswitch"}});
    for (const TensorSpec& spec : writer.order()) {
      const Pending& pending = *by_name[spec.name];
      writer.write(spec.name, pending.bytes.data(), pending.bytes.size());
    }
    writer.commit();
    shard_tensors_.push_back(std::move(names));
    ++shard_count_;
    pending_.clear();
    pending_bytes_ = 0;
  }

  std::string directory_;
  std::string staging_;
  std::uint64_t max_shard_bytes_;
  std::vector<Pending> pending_;
  std::uint64_t pending_bytes_ = 0;
  std::size_t shard_count_ = 0;
  std::vector<std::vector<std::string>> shard_tensors_;
  std::set<std::string> names_;
  bool committed_ = false;
};

class ExpertArtifact {
 public:
  // Opens NAME.meswitch/, checks the format version and (by default) every shard's sha256.
  static ExpertArtifact open(const std::string& directory, bool verify_checksums = true) {
    ExpertArtifact artifact;
    artifact.directory_ = directory;
    const std::string manifest_path = directory + "/manifest.json";
    artifact.manifest_ = nlohmann::json::parse(detail::read_text_file(manifest_path), nullptr, false);
    const nlohmann::json& manifest = artifact.manifest_;
    if (manifest.is_discarded() || !manifest.is_object())
      throw FormatError(manifest_path, "", "manifest is not a valid JSON object");
    if (manifest.value("format", "") != kArtifactFormatName)
      throw FormatError(manifest_path, "", "not a meswitch expert artifact (format is not '" +
                                               std::string(kArtifactFormatName) + "')");
    if (!manifest.contains("format_version") || !manifest["format_version"].is_number_integer() ||
        manifest["format_version"].get<int>() > kArtifactFormatVersion || manifest["format_version"].get<int>() < 1)
      throw FormatError(manifest_path, "", "unsupported format_version " + manifest.value("format_version", nlohmann::json()).dump() +
                                               " (this build reads up to " + std::to_string(kArtifactFormatVersion) + ")");
    if (!manifest.contains("shards") || !manifest["shards"].is_array() || !manifest.contains("tensors") ||
        !manifest["tensors"].is_object())
      throw FormatError(manifest_path, "", "manifest lacks 'shards' or 'tensors'");
    for (const auto& shard : manifest["shards"]) {
      const std::string file = shard.value("file", "");
      if (file.empty() || file.find('/') != std::string::npos)
        throw FormatError(manifest_path, "", "shard entry without a plain file name");
      const std::string path = directory + "/" + file;
      if (verify_checksums) {
        const std::string actual = sha256_file(path);
        if (actual != shard.value("sha256", ""))
          throw FormatError(path, "", "sha256 " + actual + " does not match the manifest's " + shard.value("sha256", ""));
      }
      artifact.shards_.push_back(std::make_shared<SafetensorsFile>(SafetensorsFile::open(path)));
      for (const auto& tensor : artifact.shards_.back()->tensors())
        artifact.location_[tensor.name] = artifact.shards_.size() - 1;
    }
    return artifact;
  }

  const nlohmann::json& manifest() const { return manifest_; }
  const std::string& directory() const { return directory_; }

  std::vector<std::string> weight_names() const {
    std::vector<std::string> names;
    for (const auto& item : manifest_["tensors"].items()) names.push_back(item.key());
    return names;
  }

  const nlohmann::json& entry(const std::string& weight) const {
    const auto& tensors = manifest_["tensors"];
    const auto found = tensors.find(weight);
    if (found == tensors.end()) throw FormatError(directory_, weight, "not in the artifact manifest");
    return *found;
  }

  std::string kind(const std::string& weight) const { return entry(weight).value("kind", ""); }

  TensorView stored(const std::string& tensor_name) const {
    const auto found = location_.find(tensor_name);
    if (found == location_.end()) throw FormatError(directory_, tensor_name, "missing from every shard");
    return shards_[found->second]->view(tensor_name);
  }

  bool has_stored(const std::string& tensor_name) const { return location_.count(tensor_name) != 0; }

  // The mapping holding a stored tensor, for callers that must keep it alive.
  const std::shared_ptr<MappedFile>& mapping_of(const std::string& tensor_name) const {
    const auto found = location_.find(tensor_name);
    if (found == location_.end()) throw FormatError(directory_, tensor_name, "missing from every shard");
    return shards_[found->second]->mapping();
  }

  // The compressed delta of `weight`, over the mapped shards (which it keeps alive),
  // refused unless every piece fits the manifest's layout and the format's rules
  // (CompressedDelta::validate: zero points, salient indices, finite values).
  CompressedDelta delta(const std::string& weight) const {
    const nlohmann::json& info = entry(weight);
    if (info.value("kind", "") != "delta") throw FormatError(directory_, weight, "is not stored as a delta");
    CompressedDelta names;
    names.name = weight;
    TensorView views[5];
    auto mappings = std::make_shared<std::vector<std::shared_ptr<MappedFile>>>();
    for (const DeltaPiece piece : kDeltaPieces) {
      views[int(piece)] = stored(names.tensor_name(piece));
      mappings->push_back(mapping_of(names.tensor_name(piece)));
    }
    const std::int64_t cols = info.at("cols").get<std::int64_t>();
    CompressedDelta delta;
    try {
      delta = CompressedDelta::over_views(weight, info.at("rows").get<std::int64_t>(), cols, info.at("bits").get<int>(),
                                          info.at("group_size").get<std::int64_t>(),
                                          info.at("salient").get<std::int64_t>(), views[0], views[1], views[2],
                                          views[3], views[4], DeltaChecks::Contents,
                                          "the manifest's cols = " + std::to_string(cols));
    } catch (const FormatError& error) {
      throw FormatError(directory_, error.tensor(), error.problem());
    }
    delta.owner = std::move(mappings);
    return delta;
  }

  // The expanded vocabulary's rows of a delta weight (an empty view when it has none).
  TensorView delta_extra_rows(const std::string& weight) const {
    const nlohmann::json& info = entry(weight);
    const std::int64_t extra = info.value("extra_rows", std::int64_t(0));
    if (extra <= 0) return TensorView();
    return checked(weight + ".extra_rows", DType::F16, {extra, info.at("cols").get<std::int64_t>()});
  }

  // Refuses a base whose fingerprint differs from the one recorded at compression.
  void check_base(const SafetensorsCheckpoint& base, const std::string& config_text) const {
    const nlohmann::json expected = manifest_.at("base");
    const nlohmann::json actual = base_fingerprint(base, config_text);
    if (expected.value("fingerprint", "") == actual["fingerprint"]) return;
    std::string detail = "fingerprint " + actual["fingerprint"].get<std::string>() + " != recorded " +
                         expected.value("fingerprint", std::string("<none>"));
    const nlohmann::json expected_tensors = expected.value("tensors", nlohmann::json::object());
    for (const auto& item : expected_tensors.items()) {
      if (!actual["tensors"].contains(item.key())) {
        detail += "; tensor '" + item.key() + "' missing from this base";
        break;
      }
      if (actual["tensors"][item.key()] != item.value()) {
        detail += "; tensor '" + item.key() + "' differs (" + actual["tensors"][item.key()].get<std::string>() +
                  " vs " + item.value().get<std::string>() + ")";
        break;
      }
    }
    throw FormatError(directory_, "", "was compressed against a different base model: " + detail);
  }

 private:
  ExpertArtifact() = default;

  TensorView checked(const std::string& tensor_name, DType dtype, const Shape& shape) const {
    const TensorView view = stored(tensor_name);
    if (view.dtype != dtype || view.shape != shape)
      throw FormatError(directory_, tensor_name, std::string("expected ") + dtype_name(dtype) + " " + shape_string(shape) +
                                                     ", found " + dtype_name(view.dtype) + " " + shape_string(view.shape));
    return view;
  }

  std::string directory_;
  nlohmann::json manifest_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::size_t> location_;
};

}  // namespace meswitch
