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
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
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

// What opening an artifact checked (the parsed manifest, where each stored tensor is,
// each shard's parsed header) and the state of every file it checked then. Immutable
// once the open succeeded, and shared by every ExpertArtifact opened from those files:
// ExpertArtifact::reopen opens the same files again from it when none has changed,
// checking nothing again, which is how the expert store reloads an evicted expert at the
// cost of reading its bytes. The identities are taken before each file is read, so a
// change during or after the open shows as a different identity later, never as the same.
struct ArtifactRecord {
  struct Shard {
    std::string path;
    FileIdentity identity;
    std::shared_ptr<const SafetensorsLayout> layout;
  };
  std::string directory;
  std::string manifest_path;
  std::uint64_t serial = 0;          // unique to this record in the process (see next_serial)
  // Every shard and side file hashed and matched, the shards over the very bytes kept
  // (ShardMemory::Resident: a file mapping's pages may still change after hashing), so
  // the identities stand for verified bytes. What reopen needs.
  bool checksums_verified = false;
  nlohmann::json manifest;
  std::vector<ArtifactSideFile> files;
  std::map<std::string, std::size_t> location;  // stored tensor -> shard
  std::optional<FileIdentity> manifest_file;    // none when the text was handed in (from_manifest)
  std::vector<Shard> shards;                    // in manifest order
  std::vector<FileIdentity> side_files;         // in `files` order
  std::optional<FileIdentity> side_directory;   // expert/, none when there is none

  static std::uint64_t next_serial() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }
};

namespace detail {

// Which spare buffer each shard of these sizes is read into (null: fresh pages): for
// each shard, largest first, the smallest spare that holds it, else the largest left
// (grown). Spares left over are freed here, before anything is read, so a load never
// holds more memory than the experts it replaces.
inline std::vector<std::shared_ptr<MappedFile>> assign_spares(const std::vector<std::uint64_t>& sizes,
                                                              std::vector<std::shared_ptr<MappedFile>>* spares) {
  std::vector<std::shared_ptr<MappedFile>> assigned(sizes.size());
  if (spares == nullptr) return assigned;
  std::vector<std::size_t> order(sizes.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return sizes[a] > sizes[b]; });
  for (const std::size_t shard : order) {
    if (spares->empty()) break;
    auto best = spares->end(), largest = spares->begin();
    for (auto spare = spares->begin(); spare != spares->end(); ++spare) {
      if ((*spare)->size() >= sizes[shard] && (best == spares->end() || (*spare)->size() < (*best)->size())) best = spare;
      if ((*spare)->size() > (*largest)->size()) largest = spare;
    }
    const auto taken = best != spares->end() ? best : largest;
    assigned[shard] = std::move(*taken);
    spares->erase(taken);
  }
  spares->clear();
  return assigned;
}

// Starts reading the first `limit` bytes of each file into the page cache, all at once
// (POSIX_FADV_WILLNEED queues the reads and returns): files read one after the other
// afterwards then wait for the disk once, not once each. Cheap when they are cached.
inline void read_ahead(const std::vector<std::string>& paths, std::uint64_t limit) {
  for (const std::string& path : paths) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;  // the read that follows reports it
    ::posix_fadvise(fd, 0, off_t(limit), POSIX_FADV_WILLNEED);
    ::close(fd);
  }
}

}  // namespace detail

class ExpertArtifact {
 public:
  // Opens NAME.meswitch/ and checks all of it (see the top of this file); shard and
  // side-file checksums only when `verify_checksums` (the default). With
  // ShardMemory::Resident, `spares` are buffers to recycle (take_buffers); a verified
  // shard is hashed while it is read, in one pass.
  static ExpertArtifact open(const std::string& directory, bool verify_checksums = true,
                             ShardMemory memory = ShardMemory::Mapped,
                             std::vector<std::shared_ptr<MappedFile>>* spares = nullptr) {
    const std::string manifest_path = directory + "/manifest.json";
    detail::require_regular_file(manifest_path);
    const std::optional<FileIdentity> manifest_file = identity_at(manifest_path);  // before the read: see ArtifactRecord
    return check_all(directory, detail::read_regular_file(manifest_path), manifest_file, verify_checksums, memory,
                     spares);
  }

  // The same with the manifest's text given (the fuzzer's entry point).
  static ExpertArtifact from_manifest(const std::string& directory, const std::string& manifest_text,
                                      bool verify_checksums = true, ShardMemory memory = ShardMemory::Mapped) {
    return check_all(directory, manifest_text, std::nullopt, verify_checksums, memory, nullptr);
  }

  // The artifact `record` was made from, again, when every file it checked is still that
  // file unchanged (FileIdentity: inode, size, mtime, ctime; also no side file added to or
  // removed from expert/): its shards read into owned memory (ShardMemory::Resident,
  // recycling `spares`) and nothing parsed, hashed or checked again, since the bytes are
  // those checked before. Nothing (std::nullopt) when any file changed or is gone: the
  // caller then opens the artifact anew, and that open reports what is wrong. `record`
  // must come from a ShardMemory::Resident open that verified the checksums.
  static std::optional<ExpertArtifact> reopen(const std::shared_ptr<const ArtifactRecord>& record,
                                              std::vector<std::shared_ptr<MappedFile>>* spares = nullptr) {
    if (!record || !record->checksums_verified)
      throw Error("ExpertArtifact::reopen needs the record of a resident open that verified the checksums");
    if (!record->manifest_file || identity_at(record->manifest_path) != record->manifest_file) return std::nullopt;
    for (std::size_t i = 0; i < record->files.size(); ++i)
      if (identity_at(record->directory + "/" + record->files[i].path) != record->side_files[i]) return std::nullopt;
    if (identity_at(record->directory + "/expert") != record->side_directory) return std::nullopt;
    std::vector<std::uint64_t> sizes;
    for (const ArtifactRecord::Shard& shard : record->shards) {
      // lstat first: the path replaced by a link to the very same file is a change too.
      if (identity_at(shard.path) != shard.identity) return std::nullopt;
      sizes.push_back(shard.identity.size);
    }
    if (record->shards.size() > 1) {
      std::vector<std::string> ahead;
      for (const ArtifactRecord::Shard& shard : record->shards) ahead.push_back(shard.path);
      detail::read_ahead(ahead, kReadAheadBytes);
    }
    std::vector<std::shared_ptr<MappedFile>> recycled = detail::assign_spares(sizes, spares);
    ExpertArtifact artifact;
    artifact.record_ = record;
    for (std::size_t i = 0; i < record->shards.size(); ++i) {
      const ArtifactRecord::Shard& shard = record->shards[i];
      std::shared_ptr<MappedFile> bytes;
      try {
        bytes = MappedFile::read(shard.path, {}, std::move(recycled[i]));
      } catch (const IoError&) {  // gone or changed meanwhile: the full open says how
        return std::nullopt;
      }
      if (bytes->identity() != shard.identity) return std::nullopt;
      artifact.shards_.push_back(std::make_shared<SafetensorsFile>(SafetensorsFile::over(std::move(bytes), shard.layout)));
    }
    return artifact;
  }

  // The shard buffers of `artifacts`, which the caller is dropping, for a read to recycle
  // (open and reopen take them as `spares`): the owned buffers of each artifact only the
  // caller holds, that nothing else holds either (a NumPy view, a delta taken from it).
  // The artifacts are released when this returns.
  static std::vector<std::shared_ptr<MappedFile>> take_buffers(
      std::vector<std::shared_ptr<const ExpertArtifact>>&& artifacts) {
    std::vector<std::shared_ptr<MappedFile>> buffers;
    for (std::shared_ptr<const ExpertArtifact>& artifact : artifacts) {
      if (artifact && artifact.use_count() == 1) {
        const std::size_t first = buffers.size();
        for (const auto& shard : artifact->shards_)
          if (shard->mapping()->owns_memory()) buffers.push_back(shard->mapping());
        artifact.reset();
        // Keep only what nobody else held (MappedFile::read checks again when it takes one).
        buffers.erase(std::remove_if(buffers.begin() + std::ptrdiff_t(first), buffers.end(),
                                     [](const std::shared_ptr<MappedFile>& buffer) { return buffer.use_count() != 1; }),
                      buffers.end());
      }
      artifact.reset();
    }
    artifacts.clear();
    return buffers;
  }

  // What this artifact was opened from and checked; shared by its reopenings.
  const std::shared_ptr<const ArtifactRecord>& record() const { return record_; }

  // The size of each shard in bytes, in manifest order.
  std::vector<std::uint64_t> shard_sizes() const {
    std::vector<std::uint64_t> sizes;
    for (const auto& shard : shards_) sizes.push_back(shard->mapping()->size());
    return sizes;
  }

  // How many shard buffers were read into recycled memory (MappedFile::recycled).
  std::size_t recycled_buffers() const {
    std::size_t count = 0;
    for (const auto& shard : shards_) count += shard->mapping()->recycled() ? 1 : 0;
    return count;
  }

  // The side files recorded in the manifest ("expert/config.json", ...).
  const std::vector<ArtifactSideFile>& side_files() const { return record_->files; }

  // One side file's bytes, read without following links and checked against its sha256.
  std::string read_side_file(const std::string& relative_path) const {
    for (const ArtifactSideFile& file : record_->files) {
      if (file.path != relative_path) continue;
      const std::string path = record_->directory + "/" + file.path;
      const std::string text = detail::read_regular_file(path);
      const std::string actual = sha256_hex(text.data(), text.size());
      if (actual != file.sha256)
        throw FormatError(path, "", "sha256 " + actual + " does not match the manifest's " + file.sha256);
      return text;
    }
    throw FormatError(record_->manifest_path, "", "no side file '" + relative_path + "' in the manifest");
  }

  const nlohmann::json& manifest() const { return record_->manifest; }
  const std::string& directory() const { return record_->directory; }

  std::vector<std::string> weight_names() const {
    std::vector<std::string> names;
    for (const auto& item : record_->manifest["tensors"].items()) names.push_back(item.key());
    return names;
  }

  const nlohmann::json& entry(const std::string& weight) const {
    const auto& tensors = record_->manifest["tensors"];
    const auto found = tensors.find(weight);
    if (found == tensors.end()) throw FormatError(record_->directory, weight, "not in the artifact manifest");
    return *found;
  }

  std::string kind(const std::string& weight) const { return entry(weight).value("kind", ""); }

  TensorView stored(const std::string& tensor_name) const {
    const auto found = record_->location.find(tensor_name);
    if (found == record_->location.end()) throw FormatError(record_->directory, tensor_name, "missing from every shard");
    return shards_[found->second]->view(tensor_name);
  }

  bool has_stored(const std::string& tensor_name) const { return record_->location.count(tensor_name) != 0; }

  // The mapping holding a stored tensor, for callers that must keep it alive.
  const std::shared_ptr<MappedFile>& mapping_of(const std::string& tensor_name) const {
    const auto found = record_->location.find(tensor_name);
    if (found == record_->location.end()) throw FormatError(record_->directory, tensor_name, "missing from every shard");
    return shards_[found->second]->mapping();
  }

  // The compressed delta of `weight`, over the mapped shards (which it keeps alive),
  // refused unless every piece fits the manifest's layout and the format's rules
  // (CompressedDelta::validate: zero points, salient indices, finite values). Opening
  // checked all of them already: DeltaChecks::Layout skips scanning the contents again.
  CompressedDelta delta(const std::string& weight, DeltaChecks checks = DeltaChecks::Contents) const {
    const nlohmann::json& info = entry(weight);
    if (info.value("kind", "") != "delta") throw FormatError(record_->directory, weight, "is not stored as a delta");
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
                                          views[3], views[4], checks,
                                          "the manifest's cols = " + std::to_string(cols));
    } catch (const FormatError& error) {  // name the shard holding the offending piece
      const auto found = record_->location.find(error.tensor());
      throw FormatError(found != record_->location.end() ? shards_[found->second]->path() : record_->directory, error.tensor(),
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
    const nlohmann::json expected = record_->manifest.at("base");
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
    throw FormatError(record_->directory, "", "was compressed against a different base model: " + detail);
  }

 private:
  ExpertArtifact() = default;

  // open() and from_manifest(): everything checked, and the record of it.
  static ExpertArtifact check_all(const std::string& directory, const std::string& manifest_text,
                                  const std::optional<FileIdentity>& manifest_file, bool verify_checksums,
                                  ShardMemory memory, std::vector<std::shared_ptr<MappedFile>>* spares) {
    ExpertArtifact artifact;
    const auto record = std::make_shared<ArtifactRecord>();
    artifact.record_ = record;
    record->serial = ArtifactRecord::next_serial();
    record->manifest_file = manifest_file;
    record->directory = directory;
    record->manifest_path = directory + "/manifest.json";
    ArtifactManifest parsed = parse_artifact_manifest(manifest_text, record->manifest_path);
    record->manifest = std::move(parsed.json);
    record->files = std::move(parsed.files);
    std::vector<std::string> paths;
    std::vector<std::uint64_t> sizes;
    for (const ArtifactShard& shard : parsed.shards) {
      paths.push_back(directory + "/" + shard.file);
      detail::require_regular_file(paths.back());
      const std::optional<FileIdentity> identity = identity_at(paths.back());
      sizes.push_back(identity ? identity->size : 0);
    }
    if (memory == ShardMemory::Resident && verify_checksums) {  // everything below is read now
      std::vector<std::string> ahead = paths;
      for (const ArtifactSideFile& file : record->files) ahead.push_back(directory + "/" + file.path);
      detail::read_ahead(ahead, kReadAheadBytes);
    }
    std::vector<std::shared_ptr<MappedFile>> recycled =
        detail::assign_spares(sizes, memory == ShardMemory::Resident ? spares : nullptr);
    for (std::size_t i = 0; i < parsed.shards.size(); ++i) {
      const ArtifactShard& shard = parsed.shards[i];
      const std::string& path = paths[i];
      std::string actual;
      std::shared_ptr<MappedFile> bytes;
      if (memory == ShardMemory::Resident) {
        Sha256 hash;
        ReadChunkSink sink;
        if (verify_checksums) sink = [&hash](const std::uint8_t* data, std::size_t size) { hash.update(data, size); };
        bytes = MappedFile::read(path, sink, std::move(recycled[i]));
        if (verify_checksums) actual = hash.hex_digest();
      } else if (verify_checksums) {
        actual = sha256_file(path);
      }
      if (verify_checksums && actual != shard.sha256)
        throw FormatError(path, "", "sha256 " + actual + " does not match the manifest's " + shard.sha256);
      artifact.shards_.push_back(std::make_shared<SafetensorsFile>(bytes ? SafetensorsFile::over(std::move(bytes))
                                                                         : SafetensorsFile::open(path)));
      const SafetensorsFile& file = *artifact.shards_.back();
      record->shards.push_back({path, file.mapping()->identity(), file.layout()});
      std::set<std::string> listed(shard.tensors.begin(), shard.tensors.end());
      for (const auto& tensor : file.tensors()) {
        if (listed.erase(tensor.name) == 0)
          throw FormatError(path, tensor.name, "stored in the shard but not listed for it in the manifest");
        record->location[tensor.name] = artifact.shards_.size() - 1;
      }
      if (!listed.empty()) throw FormatError(path, *listed.begin(), "listed in the manifest but missing from the shard");
    }
    artifact.check_entries();
    artifact.check_side_files(verify_checksums, *record);
    record->checksums_verified = verify_checksums && memory == ShardMemory::Resident;
    return artifact;
  }


  // "same" entries must match the base tensor's dtype and shape; a delta needs a
  // floating base tensor of [rows, cols].
  void check_entries_against(const SafetensorsCheckpoint& base) const {
    for (const auto& item : record_->manifest["tensors"].items()) {
      const std::string kind = item.value()["kind"].get<std::string>();
      if (kind == "full") continue;
      if (!base.contains(item.key()))
        throw FormatError(record_->manifest_path, item.key(), "entry of kind '" + kind + "' but the base has no such tensor");
      const TensorInfo& info = base.info(item.key());
      if (kind == "same") {
        const Shape shape = item.value()["shape"].get<Shape>();
        if (dtype_name(info.dtype) != item.value()["dtype"].get<std::string>() || info.shape != shape)
          throw FormatError(record_->manifest_path, item.key(), "entry 'same' says " + item.value()["dtype"].get<std::string>() +
                                                            " " + shape_string(shape) + ", the base tensor is " +
                                                            dtype_name(info.dtype) + " " + shape_string(info.shape));
      } else {
        const Shape shape{item.value()["rows"].get<std::int64_t>(), item.value()["cols"].get<std::int64_t>()};
        if (!is_floating(info.dtype) || info.shape != shape)
          throw FormatError(record_->manifest_path, item.key(), "delta of " + shape_string(shape) + " but the base tensor is " +
                                                            dtype_name(info.dtype) + " " + shape_string(info.shape));
      }
    }
  }

  // The stored tensor, which must have the dtype and shape its manifest entry implies.
  TensorView checked(const std::string& tensor_name, DType dtype, const Shape& shape) const {
    const TensorView view = stored(tensor_name);
    if (view.dtype != dtype || view.shape != shape)
      throw FormatError(shards_[record_->location.at(tensor_name)]->path(), tensor_name,
                        std::string("expected ") + dtype_name(dtype) + " " + shape_string(shape) +
                            " from its manifest entry, found " + dtype_name(view.dtype) + " " + shape_string(view.shape));
    return view;
  }

  // Every stored tensor is the one its entry implies, and nothing else is stored.
  void check_entries() const {
    std::set<std::string> expected;
    for (const auto& item : record_->manifest["tensors"].items()) {
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
    for (const auto& item : record_->location)
      if (expected.count(item.first) == 0)
        throw FormatError(shards_[item.second]->path(), item.first, "stored but described by no manifest entry");
  }

  // Side files: regular files directly in expert/, each listed with its size and sha256,
  // and nothing else there. Their identities, and that of expert/, go into `record`.
  void check_side_files(bool verify_checksums, ArtifactRecord& record) const {
    std::set<std::string> listed;
    for (const ArtifactSideFile& file : record_->files) {
      const std::string path = record_->directory + "/" + file.path;
      detail::require_regular_file(path);
      record.side_files.push_back(identity_at(path).value_or(FileIdentity{}));
      struct stat info {};
      ::lstat(path.c_str(), &info);
      if (std::uint64_t(info.st_size) != file.bytes)
        throw FormatError(path, "", "holds " + std::to_string(info.st_size) + " bytes, the manifest says " +
                                        std::to_string(file.bytes));
      if (verify_checksums) read_side_file(file.path);
      listed.insert(file.path.substr(std::string("expert/").size()));
    }
    const std::string side_directory = record_->directory + "/expert";
    record.side_directory = identity_at(side_directory);
    struct stat info {};
    if (::lstat(side_directory.c_str(), &info) != 0) {
      if (!record_->files.empty()) throw FormatError(side_directory, "", "is missing (the manifest lists side files)");
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

  std::shared_ptr<const ArtifactRecord> record_;
  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
};

}  // namespace meswitch
