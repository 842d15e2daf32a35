// The compressed-expert artifact: a directory NAME.meswitch/ holding
//
//   manifest.json                        format version, expert and base identity,
//                                        quantization settings, per-tensor entries,
//                                        sha256 of every shard and side file
//                                        (spec: docs/format.md, checks: artifact_manifest.hpp)
//   deltas-0000i-of-0000N.safetensors    the tensors, readable by any safetensors reader
//   expert/                              the expert's config.json, tokenizer files, ...
//
// Per weight W of kind "delta" the shards hold W.qweight (U32 [rows, words]),
// W.scales (F16 [rows, groups]), W.zeros (U8 [rows, groups]), W.salient_idx
// (I32 [k]), W.salient (F16 [rows, k]) and, for an expanded vocabulary,
// W.extra_rows ([extra, cols] in the expert's dtype). Kind "full" stores W.full
// whole; kind "same" stores nothing (the tensor equals the base's).
//
// Writing stages everything in a temporary sibling directory and swaps it into
// place on commit (output_directory.hpp), so an interrupted compression leaves the
// old artifact or the new one, never half of one. Reading trusts nothing: the
// manifest is checked completely, every shard and side file must be a regular file
// inside the artifact whose sha256 matches, and every stored tensor must be the
// dtype and shape its entry implies.
#pragma once

#include <fcntl.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "meswitch/artifact_manifest.hpp"
#include "meswitch/compressed_delta.hpp"
#include "meswitch/error.hpp"
#include "meswitch/output_directory.hpp"
#include "meswitch/safetensors.hpp"
#include "meswitch/sha256.hpp"
#include "meswitch/sharded_safetensors.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {


namespace detail {

inline std::string read_text_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) throw IoError("cannot open '" + path + "'");
  std::stringstream buffer;
  buffer << stream.rdbuf();
  return buffer.str();
}

// Refuses anything but a regular file: a symbolic link inside an artifact could point
// anywhere on the reader's machine.
inline void require_regular_file(const std::string& path) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  if (S_ISLNK(info.st_mode)) throw FormatError(path, "", "is a symbolic link; an artifact holds regular files only");
  if (!S_ISREG(info.st_mode)) throw FormatError(path, "", "is not a regular file");
}

// The bytes of a regular file, opened without following a final symbolic link.
inline std::string read_regular_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ELOOP) throw FormatError(path, "", "is a symbolic link; an artifact holds regular files only");
    throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  }
  struct stat info {};
  std::string text;
  const bool regular = ::fstat(fd, &info) == 0 && S_ISREG(info.st_mode);
  if (regular) {
    text.resize(std::size_t(info.st_size));
    std::size_t done = 0;
    while (done < text.size()) {
      const ssize_t got = ::read(fd, &text[done], text.size() - done);
      if (got <= 0) break;
      done += std::size_t(got);
    }
    text.resize(done);
  }
  ::close(fd);
  if (!regular) throw FormatError(path, "", "is not a regular file");
  return text;
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
  // Checks the output path first (output_directory.hpp): an existing artifact is
  // replaced only when `replace` is set; anything else there, the current directory
  // and the `inputs` (base, expert) are refused before any work. A shard is flushed
  // before it would pass `max_shard_bytes` (a single larger tensor gets a shard of its own).
  explicit ArtifactWriter(std::string directory, std::uint64_t max_shard_bytes = 128ull << 20, bool replace = false,
                          std::vector<ProtectedPath> inputs = {})
      : directory_(strip_slash(std::move(directory))), max_shard_bytes_(max_shard_bytes), replace_(replace),
        inputs_(std::move(inputs)) {
    if (max_shard_bytes_ == 0) throw Error("max_shard_bytes must be positive");
    check_output_directory(directory_, kArtifactMarker, replace_, inputs_);
    staging_ = make_staging_directory(directory_);
  }

  ~ArtifactWriter() {
    if (!committed_) detail::remove_tree(staging_);
  }
  ArtifactWriter(const ArtifactWriter&) = delete;
  ArtifactWriter& operator=(const ArtifactWriter&) = delete;

  // Queues one tensor (bytes copied); shards never pass max_shard_bytes of tensor data
  // unless one tensor alone does.
  void add_tensor(const std::string& name, DType dtype, const Shape& shape, const void* data) {
    if (!names_.insert(name).second) throw FormatError(directory_, name, "added twice to the artifact");
    Pending pending{{name, dtype, shape}, {}};
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    const std::uint64_t size = pending.spec.nbytes();
    if (!pending_.empty() && pending_bytes_ + size > max_shard_bytes_) flush();
    pending.bytes.assign(bytes, bytes + size);
    pending_bytes_ += size;
    pending_.push_back(std::move(pending));
    if (pending_bytes_ >= max_shard_bytes_) flush();
  }

  // Copies a small file of the expert (config.json, tokenizer ...) into the artifact as
  // expert/NAME and records its sha256 in the manifest.
  void add_file(const std::string& relative_path, const std::string& source_path) {
    add_file_content(relative_path, detail::read_text_file(source_path));
  }

  void add_file_content(const std::string& relative_path, const std::string& content) {
    const std::string prefix = "expert/";
    if (relative_path.compare(0, prefix.size(), prefix) != 0 ||
        !detail::is_plain_file_name(relative_path.substr(prefix.size())))
      throw Error("artifact side file '" + relative_path + "' must be named expert/NAME with NAME a plain file name");
    for (const ArtifactSideFile& file : files_)
      if (file.path == relative_path) throw Error("artifact side file '" + relative_path + "' added twice");
    ::mkdir((staging_ + "/expert").c_str(), 0755);
    AtomicFileWriter file(staging_ + "/" + relative_path);
    file.write(content.data(), content.size());
    file.commit();
    files_.push_back({relative_path, sha256_hex(content.data(), content.size()), content.size()});
  }

  // Writes the last shard and manifest.json (with "format", "format_version", "shards"
  // and "files" filled in), then swaps the artifact into place in one step.
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
    nlohmann::json files = nlohmann::json::array();
    std::vector<ArtifactSideFile> sorted = files_;
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
    for (const ArtifactSideFile& file : sorted)
      files.push_back({{"path", file.path}, {"sha256", file.sha256}, {"bytes", file.bytes}});
    manifest["format"] = kArtifactFormatName;
    manifest["format_version"] = kArtifactFormatVersion;
    manifest["shards"] = shards;
    manifest["files"] = files;
    const std::string text = manifest.dump(2) + "\n";
    AtomicFileWriter manifest_file(staging_ + "/manifest.json");
    manifest_file.write(text.data(), text.size());
    manifest_file.commit();
    // Whatever appeared at the target while compressing is checked again, just before the swap.
    check_output_directory(directory_, kArtifactMarker, replace_, inputs_);
    commit_directory(staging_, directory_);
    committed_ = true;
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
  bool replace_;
  std::vector<ProtectedPath> inputs_;
  std::vector<Pending> pending_;
  std::uint64_t pending_bytes_ = 0;
  std::size_t shard_count_ = 0;
  std::vector<std::vector<std::string>> shard_tensors_;
  std::vector<ArtifactSideFile> files_;
  std::set<std::string> names_;
  bool committed_ = false;
};

// Where an opened artifact's shard bytes live: mapped from the files (paged in when
// touched, shared with the page cache) or read into memory the artifact owns
// (MappedFile::read: resident, and the checksum is taken over the very bytes used).
enum class ShardMemory { Mapped, Resident };

class ExpertArtifact {
 public:
  // Opens NAME.meswitch/ and checks all of it (see the top of this file); shard and
  // side-file checksums only when `verify_checksums` (the default).
  static ExpertArtifact open(const std::string& directory, bool verify_checksums = true,
                             ShardMemory memory = ShardMemory::Mapped) {
    const std::string manifest_path = directory + "/manifest.json";
    detail::require_regular_file(manifest_path);
    return from_manifest(directory, detail::read_regular_file(manifest_path), verify_checksums, memory);
  }

  // The same with the manifest's text given (the fuzzer's entry point).
  static ExpertArtifact from_manifest(const std::string& directory, const std::string& manifest_text,
                                      bool verify_checksums = true, ShardMemory memory = ShardMemory::Mapped) {
    ExpertArtifact artifact;
    artifact.directory_ = directory;
    artifact.manifest_path_ = directory + "/manifest.json";
    ArtifactManifest parsed = parse_artifact_manifest(manifest_text, artifact.manifest_path_);
    artifact.manifest_ = std::move(parsed.json);
    artifact.files_ = std::move(parsed.files);
    for (const ArtifactShard& shard : parsed.shards) {
      const std::string path = directory + "/" + shard.file;
      detail::require_regular_file(path);
      std::shared_ptr<MappedFile> bytes = memory == ShardMemory::Resident ? MappedFile::read(path) : nullptr;
      if (verify_checksums) {
        const std::string actual = bytes ? sha256_hex(bytes->data(), bytes->size()) : sha256_file(path);
        if (actual != shard.sha256)
          throw FormatError(path, "", "sha256 " + actual + " does not match the manifest's " + shard.sha256);
      }
      artifact.shards_.push_back(std::make_shared<SafetensorsFile>(bytes ? SafetensorsFile::over(std::move(bytes))
                                                                         : SafetensorsFile::open(path)));
      std::set<std::string> listed(shard.tensors.begin(), shard.tensors.end());
      for (const auto& tensor : artifact.shards_.back()->tensors()) {
        if (listed.erase(tensor.name) == 0)
          throw FormatError(path, tensor.name, "stored in the shard but not listed for it in the manifest");
        artifact.location_[tensor.name] = artifact.shards_.size() - 1;
      }
      if (!listed.empty()) throw FormatError(path, *listed.begin(), "listed in the manifest but missing from the shard");
    }
    artifact.check_entries();
    artifact.check_side_files(verify_checksums);
    return artifact;
  }

  // The size of each shard in bytes, in manifest order.
  std::vector<std::uint64_t> shard_sizes() const {
    std::vector<std::uint64_t> sizes;
    for (const auto& shard : shards_) sizes.push_back(shard->mapping()->size());
    return sizes;
  }

  // Each shard file as it was when opened, in manifest order.
  std::vector<FileIdentity> shard_identities() const {
    std::vector<FileIdentity> identities;
    for (const auto& shard : shards_) identities.push_back(shard->mapping()->identity());
    return identities;
  }

  // The side files recorded in the manifest ("expert/config.json", ...).
  const std::vector<ArtifactSideFile>& side_files() const { return files_; }

  // One side file's bytes, read without following links and checked against its sha256.
  std::string read_side_file(const std::string& relative_path) const {
    for (const ArtifactSideFile& file : files_) {
      if (file.path != relative_path) continue;
      const std::string path = directory_ + "/" + file.path;
      const std::string text = detail::read_regular_file(path);
      const std::string actual = sha256_hex(text.data(), text.size());
      if (actual != file.sha256)
        throw FormatError(path, "", "sha256 " + actual + " does not match the manifest's " + file.sha256);
      return text;
    }
    throw FormatError(manifest_path_, "", "no side file '" + relative_path + "' in the manifest");
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
    } catch (const FormatError& error) {  // name the shard holding the offending piece
      const auto found = location_.find(error.tensor());
      throw FormatError(found != location_.end() ? shards_[found->second]->path() : directory_, error.tensor(),
                        error.problem());
    }
    delta.owner = std::move(mappings);
    return delta;
  }

  // The expanded vocabulary's rows of a delta weight, in the entry's dtype (an empty
  // view when it has none).
  TensorView delta_extra_rows(const std::string& weight) const {
    const nlohmann::json& info = entry(weight);
    const std::int64_t extra = info.value("extra_rows", std::int64_t(0));
    if (extra <= 0) return TensorView();
    DType dtype{};
    parse_dtype(info.at("dtype").get<std::string>(), dtype);  // checked with the manifest
    return checked(weight + ".extra_rows", dtype, {extra, info.at("cols").get<std::int64_t>()});
  }

  // Refuses a base whose fingerprint differs from the one recorded at compression.
  void check_base(const SafetensorsCheckpoint& base, const std::string& config_text) const {
    check_base_fingerprint(base, base_fingerprint(base, config_text));
  }

  // The same with the base's fingerprint computed once by the caller (base_fingerprint
  // reads every byte of the base), for checking many experts against one base.
  void check_base_fingerprint(const SafetensorsCheckpoint& base, const nlohmann::json& actual) const {
    const nlohmann::json expected = manifest_.at("base");
    if (expected.value("fingerprint", "") == actual["fingerprint"]) return check_entries_against(base);
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

  // "same" entries must match the base tensor's dtype and shape; a delta needs a
  // floating base tensor of [rows, cols].
  void check_entries_against(const SafetensorsCheckpoint& base) const {
    for (const auto& item : manifest_["tensors"].items()) {
      const std::string kind = item.value()["kind"].get<std::string>();
      if (kind == "full") continue;
      if (!base.contains(item.key()))
        throw FormatError(manifest_path_, item.key(), "entry of kind '" + kind + "' but the base has no such tensor");
      const TensorInfo& info = base.info(item.key());
      if (kind == "same") {
        const Shape shape = item.value()["shape"].get<Shape>();
        if (dtype_name(info.dtype) != item.value()["dtype"].get<std::string>() || info.shape != shape)
          throw FormatError(manifest_path_, item.key(), "entry 'same' says " + item.value()["dtype"].get<std::string>() +
                                                            " " + shape_string(shape) + ", the base tensor is " +
                                                            dtype_name(info.dtype) + " " + shape_string(info.shape));
      } else {
        const Shape shape{item.value()["rows"].get<std::int64_t>(), item.value()["cols"].get<std::int64_t>()};
        if (!is_floating(info.dtype) || info.shape != shape)
          throw FormatError(manifest_path_, item.key(), "delta of " + shape_string(shape) + " but the base tensor is " +
                                                            dtype_name(info.dtype) + " " + shape_string(info.shape));
      }
    }
  }

  // The stored tensor, which must have the dtype and shape its manifest entry implies.
  TensorView checked(const std::string& tensor_name, DType dtype, const Shape& shape) const {
    const TensorView view = stored(tensor_name);
    if (view.dtype != dtype || view.shape != shape)
      throw FormatError(shards_[location_.at(tensor_name)]->path(), tensor_name,
                        std::string("expected ") + dtype_name(dtype) + " " + shape_string(shape) +
                            " from its manifest entry, found " + dtype_name(view.dtype) + " " + shape_string(view.shape));
    return view;
  }

  // Every stored tensor is the one its entry implies, and nothing else is stored.
  void check_entries() const {
    std::set<std::string> expected;
    for (const auto& item : manifest_["tensors"].items()) {
      const std::string& weight = item.key();
      const nlohmann::json& info = item.value();
      const std::string kind = info["kind"].get<std::string>();
      DType dtype{};
      parse_dtype(info["dtype"].get<std::string>(), dtype);
      if (kind == "full") {
        checked(weight + ".full", dtype, info["shape"].get<Shape>());
        expected.insert(weight + ".full");
      } else if (kind == "delta") {
        const CompressedDelta pieces = delta(weight);  // checks the five tensors and their contents
        for (const DeltaPiece piece : kDeltaPieces) expected.insert(pieces.tensor_name(piece));
        if (delta_extra_rows(weight).data != nullptr) expected.insert(weight + ".extra_rows");
      }
    }
    for (const auto& item : location_)
      if (expected.count(item.first) == 0)
        throw FormatError(shards_[item.second]->path(), item.first, "stored but described by no manifest entry");
  }

  // Side files: regular files directly in expert/, each listed with its size and sha256,
  // and nothing else there.
  void check_side_files(bool verify_checksums) const {
    std::set<std::string> listed;
    for (const ArtifactSideFile& file : files_) {
      const std::string path = directory_ + "/" + file.path;
      detail::require_regular_file(path);
      struct stat info {};
      ::lstat(path.c_str(), &info);
      if (std::uint64_t(info.st_size) != file.bytes)
        throw FormatError(path, "", "holds " + std::to_string(info.st_size) + " bytes, the manifest says " +
                                        std::to_string(file.bytes));
      if (verify_checksums) read_side_file(file.path);
      listed.insert(file.path.substr(std::string("expert/").size()));
    }
    const std::string side_directory = directory_ + "/expert";
    struct stat info {};
    if (::lstat(side_directory.c_str(), &info) != 0) {
      if (!files_.empty()) throw FormatError(side_directory, "", "is missing (the manifest lists side files)");
      return;
    }
    if (!S_ISDIR(info.st_mode)) throw FormatError(side_directory, "", "is not a directory");
    DIR* directory = ::opendir(side_directory.c_str());
    if (directory == nullptr) throw IoError("cannot list '" + side_directory + "'");
    std::string unlisted;
    while (dirent* entry = ::readdir(directory)) {
      const std::string name = entry->d_name;
      if (name != "." && name != ".." && listed.count(name) == 0 && unlisted.empty()) unlisted = name;
    }
    ::closedir(directory);
    if (!unlisted.empty())
      throw FormatError(side_directory + "/" + unlisted, "", "is not listed in the manifest's 'files'");
  }

  std::string directory_;
  std::string manifest_path_;
  nlohmann::json manifest_;
  std::vector<ArtifactSideFile> files_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::size_t> location_;
};

}  // namespace meswitch
