// One logical checkpoint made of one or many safetensors files.
//
// Hugging Face saves large models as shards plus `model.safetensors.index.json`
// ({"metadata": {...}, "weight_map": {tensor: shard file}}). A SafetensorsCheckpoint
// accepts a directory, an index file or a single .safetensors file, lists every
// tensor from the index without mapping any shard, and maps a shard (validating
// its whole header) the first time one of its tensors is asked for.
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/safetensors.hpp"

namespace meswitch {

namespace detail {

inline bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

inline bool is_regular_file(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

inline std::string parent_directory(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

inline bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace detail

class SafetensorsCheckpoint {
 public:
  static constexpr const char* kIndexName = "model.safetensors.index.json";
  static constexpr const char* kSingleName = "model.safetensors";

  static SafetensorsCheckpoint open(const std::string& path) {
    SafetensorsCheckpoint checkpoint;
    if (detail::is_directory(path)) {
      const std::string index = path + "/" + kIndexName;
      const std::string single = path + "/" + kSingleName;
      if (detail::is_regular_file(index)) {
        checkpoint.load_index(index);
      } else if (detail::is_regular_file(single)) {
        checkpoint.load_single(single);
      } else {
        throw FormatError(path, "", std::string("directory has neither ") + kIndexName + " nor " + kSingleName);
      }
    } else if (detail::ends_with(path, ".json")) {
      checkpoint.load_index(path);
    } else {
      checkpoint.load_single(path);
    }
    return checkpoint;
  }

  // Tensor names in a stable (sorted) order.
  std::vector<std::string> names() const {
    std::vector<std::string> result;
    result.reserve(location_.size());
    for (const auto& entry : location_) result.push_back(entry.first);
    return result;
  }
  bool contains(const std::string& name) const { return location_.count(name) != 0; }
  std::size_t size() const { return location_.size(); }
  const std::vector<std::string>& shard_paths() const { return shard_paths_; }
  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& index_metadata() const { return index_metadata_; }

  // The file holding `name`, mapped and validated on first use.
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto found = location_.find(name);
    if (found == location_.end()) throw FormatError(source_, name, "no such tensor in this checkpoint");
    const SafetensorsFile& file = shard(found->second);
    if (!file.contains(name))
      throw FormatError(file.path(), name, "named in " + source_ + " but absent from the shard");
    return file;
  }
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  TensorView view(const std::string& name) const { return file_of(name).view(name); }
  std::vector<float> read_f32(const std::string& name) const { return file_of(name).read_f32(name); }

  // Lets the kernel reclaim the pages of a tensor the caller is done with.
  // Bytes [offset, offset + size) of the tensor (default: all of it).
  void release(const std::string& name, std::size_t offset = 0, std::size_t size = SIZE_MAX) const {
    const SafetensorsFile& file = file_of(name);
    const TensorView view = file.view(name);
    if (offset >= view.nbytes()) return;
    size = std::min(size, view.nbytes() - offset);
    file.mapping()->release(
        std::size_t(static_cast<const std::uint8_t*>(view.data) - file.mapping()->data()) + offset, size);
  }

 private:
  SafetensorsCheckpoint() = default;

  void load_single(const std::string& path) {
    source_ = path;
    shard_paths_ = {path};
    shards_.resize(1);
    mutex_ = std::make_shared<std::mutex>();
    const SafetensorsFile& file = shard(0);  // a single file is validated at once
    for (const auto& tensor : file.tensors()) location_[tensor.name] = 0;
  }

  void load_index(const std::string& path) {
    source_ = path;
    mutex_ = std::make_shared<std::mutex>();
    std::ifstream stream(path, std::ios::binary);
    if (!stream) throw IoError("cannot open '" + path + "'");
    std::stringstream buffer;
    buffer << stream.rdbuf();
    const nlohmann::json index = nlohmann::json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object()) throw FormatError(path, "", "index is not a valid JSON object");
    const auto weight_map = index.find("weight_map");
    if (weight_map == index.end() || !weight_map->is_object())
      throw FormatError(path, "", "index has no 'weight_map' object");
    if (index.contains("metadata") && index["metadata"].is_object()) {
      for (const auto& item : index["metadata"].items())
        index_metadata_[item.key()] = item.value().is_string() ? item.value().get<std::string>() : item.value().dump();
    }
    const std::string directory = detail::parent_directory(path);
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& item : weight_map->items()) {
      if (!item.value().is_string()) throw FormatError(path, item.key(), "weight_map value is not a file name");
      const std::string file = item.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        throw FormatError(path, item.key(), "shard name '" + file + "' is not a plain file name");
      auto found = shard_of_file.find(file);
      if (found == shard_of_file.end()) {
        const std::string shard_path = directory + "/" + file;
        if (!detail::is_regular_file(shard_path))
          throw FormatError(path, item.key(), "shard '" + file + "' named in the index is missing");
        found = shard_of_file.emplace(file, shard_paths_.size()).first;
        shard_paths_.push_back(shard_path);
      }
      location_[item.key()] = found->second;
    }
    shards_.resize(shard_paths_.size());
  }

  const SafetensorsFile& shard(std::size_t index) const {
    std::lock_guard<std::mutex> lock(*mutex_);
    if (!shards_[index]) shards_[index] = std::make_shared<SafetensorsFile>(SafetensorsFile::open(shard_paths_[index]));
    return *shards_[index];
  }

  std::string source_;
  std::vector<std::string> shard_paths_;
  std::map<std::string, std::size_t> location_;
  std::map<std::string, std::string> index_metadata_;
  mutable std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::shared_ptr<std::mutex> mutex_;
};

}  // namespace meswitch
