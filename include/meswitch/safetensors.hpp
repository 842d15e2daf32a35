// The safetensors format: validated reading, atomic streaming writing, sharded checkpoints.
//
//   [u64 little-endian N][N bytes of JSON header][data buffer]
//   header: {"__metadata__": {str: str}, NAME: {"dtype", "shape", "data_offsets": [b, e]}, ...}
//
// Reading validates the *whole* header before any tensor byte is touched: the
// JSON must parse, every dtype be known, every dtype x shape match its byte range,
// and the ranges, sorted, must tile the data buffer exactly (in range, no overlap,
// no gap), as the reference implementation demands. Any violation is a FormatError
// naming the file and the tensor. Writing goes through a temporary file and a
// rename; tensors are laid out by decreasing alignment after a header padded to 8
// bytes, so every tensor is aligned to its element size inside the mapping.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/mapped_file.hpp"
#include "meswitch/tensor.hpp"

namespace meswitch {

// Larger headers are rejected before parsing (the reference uses the same bound).
constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1024 * 1024;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::uint64_t begin = 0;  // byte offsets relative to the data buffer
  std::uint64_t end = 0;

  std::uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // sorted by begin offset
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;  // absolute file offset of the data buffer
};

namespace detail {

inline std::uint64_t read_u64_le(const std::uint8_t* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

inline TensorInfo parse_tensor_entry(const std::string& file, const std::string& name,
                                     const nlohmann::json& entry) {
  auto fail = [&](const std::string& problem) { return FormatError(file, name, problem); };
  if (!entry.is_object()) throw fail("header entry is not a JSON object");
  TensorInfo info;
  info.name = name;

  const auto dtype = entry.find("dtype");
  if (dtype == entry.end() || !dtype->is_string()) throw fail("missing or non-string 'dtype'");
  if (!parse_dtype(dtype->get<std::string>(), info.dtype))
    throw fail("unsupported dtype '" + dtype->get<std::string>() + "'");

  const auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array()) throw fail("missing or non-array 'shape'");
  std::uint64_t expected_bytes = dtype_size(info.dtype);
  bool empty = false;
  for (const auto& dim : *shape) {
    if (!dim.is_number_unsigned())
      throw fail("shape " + shape->dump() + " has a negative or non-integer dimension");
    const std::uint64_t size = dim.get<std::uint64_t>();
    if (size > std::uint64_t(INT64_MAX)) throw fail("shape " + shape->dump() + " dimension too large");
    info.shape.push_back(std::int64_t(size));
    if (size == 0) empty = true;
    else if (!empty && expected_bytes > UINT64_MAX / size) throw fail("shape " + shape->dump() + " overflows 64 bits");
    else if (!empty) expected_bytes *= size;
  }
  if (empty) expected_bytes = 0;

  const auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned())
    throw fail("'data_offsets' must be two non-negative integers");
  info.begin = (*offsets)[0].get<std::uint64_t>();
  info.end = (*offsets)[1].get<std::uint64_t>();
  if (info.end < info.begin)
    throw fail("data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) + "] end before begin");
  if (info.end - info.begin != expected_bytes)
    throw fail("dtype " + std::string(dtype_name(info.dtype)) + " x shape " + shape_string(info.shape) +
               " needs " + std::to_string(expected_bytes) + " bytes but data_offsets span " +
               std::to_string(info.end - info.begin));
  for (const auto& item : entry.items()) {
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets")
      throw fail("unexpected field '" + item.key() + "'");
  }
  return info;
}

}  // namespace detail

// Parses and validates the header of a safetensors file held in `bytes` (the whole
// file, or at least its first 8 + N bytes when `file_size` gives the real size).
// `file` only names the source in error messages. This is the fuzzing entry point.
inline SafetensorsHeader parse_safetensors_header(const std::uint8_t* bytes, std::uint64_t available,
                                                  std::uint64_t file_size, const std::string& file) {
  if (file_size < 8 || available < 8)
    throw FormatError(file, "", "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  const std::uint64_t header_bytes = detail::read_u64_le(bytes);
  if (header_bytes > kMaxSafetensorsHeaderBytes)
    throw FormatError(file, "", "header length " + std::to_string(header_bytes) + " exceeds the " +
                                    std::to_string(kMaxSafetensorsHeaderBytes) + "-byte limit");
  if (header_bytes > file_size - 8 || header_bytes > available - 8)
    throw FormatError(file, "", "header length " + std::to_string(header_bytes) + " runs past the end of the file (" +
                                    std::to_string(file_size) + " bytes)");
  if (header_bytes < 2 || bytes[8] != '{')
    throw FormatError(file, "", "header does not start with a JSON object");

  nlohmann::json document = nlohmann::json::parse(bytes + 8, bytes + 8 + header_bytes, nullptr,
                                                  /*allow_exceptions=*/false);
  if (document.is_discarded()) throw FormatError(file, "", "header is not valid JSON");
  if (!document.is_object()) throw FormatError(file, "", "header is not a JSON object");

  SafetensorsHeader header;
  header.data_start = 8 + header_bytes;
  for (const auto& item : document.items()) {
    if (item.key() == "__metadata__") {
      if (!item.value().is_object()) throw FormatError(file, "__metadata__", "is not a JSON object");
      for (const auto& meta : item.value().items()) {
        if (!meta.value().is_string())
          throw FormatError(file, "__metadata__", "value of '" + meta.key() + "' is not a string");
        header.metadata[meta.key()] = meta.value().get<std::string>();
      }
      continue;
    }
    header.tensors.push_back(detail::parse_tensor_entry(file, item.key(), item.value()));
  }

  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const std::uint64_t data_bytes = file_size - header.data_start;
  std::uint64_t expected_begin = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& tensor : header.tensors) {
    if (tensor.begin < expected_begin)
      throw FormatError(file, tensor.name, "data_offsets [" + std::to_string(tensor.begin) + ", " +
                                               std::to_string(tensor.end) + "] overlap tensor '" +
                                               previous->name + "'");
    if (tensor.begin > expected_begin)
      throw FormatError(file, tensor.name, "data_offsets begin at " + std::to_string(tensor.begin) +
                                               " leaving a gap after byte " + std::to_string(expected_begin));
    if (tensor.end > data_bytes)
      throw FormatError(file, tensor.name, "data_offsets end at " + std::to_string(tensor.end) +
                                               " past the data buffer of " + std::to_string(data_bytes) + " bytes");
    expected_begin = tensor.end;
    previous = &tensor;
  }
  if (expected_begin != data_bytes)
    throw FormatError(file, "", "tensors cover " + std::to_string(expected_begin) + " of the " +
                                    std::to_string(data_bytes) + " data bytes (truncated or trailing data)");
  return header;
}

// A validated, memory-mapped safetensors file. Views stay valid while any copy of
// the shared MappedFile is alive (the Python layer keeps it in each array's base).
// A file's header parsed and indexed: shared by every SafetensorsFile over the same bytes.
struct SafetensorsLayout {
  SafetensorsHeader header;
  std::unordered_map<std::string, std::size_t> index;  // tensor name -> header.tensors position
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path) { return over(MappedFile::open(path)); }

  // The same over bytes already in memory (MappedFile::read), validated the same way.
  static SafetensorsFile over(std::shared_ptr<MappedFile> bytes) {
    auto layout = std::make_shared<SafetensorsLayout>();
    layout->header = parse_safetensors_header(bytes->data(), bytes->size(), bytes->size(), bytes->path());
    for (std::size_t i = 0; i < layout->header.tensors.size(); ++i)
      layout->index.emplace(layout->header.tensors[i].name, i);
    return over(std::move(bytes), std::move(layout));
  }

  // Over bytes the caller knows to be those `layout` was parsed from (the same file,
  // unchanged since: the expert store compares file identities); nothing is parsed again.
  static SafetensorsFile over(std::shared_ptr<MappedFile> bytes, std::shared_ptr<const SafetensorsLayout> layout) {
    SafetensorsFile file;
    file.mapping_ = std::move(bytes);
    file.layout_ = std::move(layout);
    return file;
  }

  const std::shared_ptr<const SafetensorsLayout>& layout() const { return layout_; }
  const std::string& path() const { return mapping_->path(); }
  const std::vector<TensorInfo>& tensors() const { return layout_->header.tensors; }
  const std::map<std::string, std::string>& metadata() const { return layout_->header.metadata; }
  const std::shared_ptr<MappedFile>& mapping() const { return mapping_; }
  bool contains(const std::string& name) const { return layout_->index.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    const auto found = layout_->index.find(name);
    if (found == layout_->index.end()) throw FormatError(path(), name, "no such tensor in this file");
    return layout_->header.tensors[found->second];
  }

  // A view into the mapping. Files meswitch writes keep every tensor aligned to its
  // element size; for foreign files check `is_aligned` before dereferencing as T*.
  TensorView view(const std::string& name) const {
    const TensorInfo& tensor = info(name);
    return TensorView(mapping_->mutable_data() + layout_->header.data_start + tensor.begin, tensor.dtype, tensor.shape);
  }

  static bool is_aligned(const TensorView& view) {
    return reinterpret_cast<std::uintptr_t>(view.data) % dtype_size(view.dtype) == 0;
  }

  // A float32 copy of a floating tensor (works for unaligned data too).
  std::vector<float> read_f32(const std::string& name) const {
    const TensorInfo& tensor = info(name);
    if (!is_floating(tensor.dtype))
      throw FormatError(path(), name, std::string("dtype ") + dtype_name(tensor.dtype) + " is not floating");
    const std::size_t count = std::size_t(element_count(tensor.shape));
    const std::uint8_t* source = mapping_->data() + layout_->header.data_start + tensor.begin;
    std::vector<float> out(count);
    const std::size_t item = dtype_size(tensor.dtype);
    for (std::size_t i = 0; i < count; ++i) {
      if (item == 4) {
        std::memcpy(&out[i], source + 4 * i, 4);
      } else {
        std::uint16_t half;
        std::memcpy(&half, source + 2 * i, 2);
        out[i] = tensor.dtype == DType::F16 ? f16_to_float(half) : bf16_to_float(half);
      }
    }
    return out;
  }

 private:
  SafetensorsFile() = default;
  std::shared_ptr<MappedFile> mapping_;
  std::shared_ptr<const SafetensorsLayout> layout_;
};

// A tensor about to be written: name, dtype and shape are declared up front so
// the header can be written first and the data streamed tensor by tensor.
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;

  std::uint64_t nbytes() const { return std::uint64_t(element_count(shape)) * dtype_size(dtype); }
};

// Streams one safetensors file: declare every tensor, then write their bytes in
// any order-of-declaration-independent way (write() checks sizes), then commit().
// Only one tensor's bytes need to exist in memory at a time.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, std::vector<TensorSpec> specs,
                    const std::map<std::string, std::string>& metadata = {})
      : file_(path), specs_(std::move(specs)) {
    // Decreasing element size, then name: every tensor lands aligned to its dtype.
    std::stable_sort(specs_.begin(), specs_.end(), [](const TensorSpec& a, const TensorSpec& b) {
      const auto size_a = dtype_size(a.dtype), size_b = dtype_size(b.dtype);
      return size_a != size_b ? size_a > size_b : a.name < b.name;
    });
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      const TensorSpec& spec = specs_[i];
      if (spec.name.empty() || spec.name == "__metadata__")
        throw FormatError(path, spec.name, "invalid tensor name");
      if (!position_.emplace(spec.name, i).second) throw FormatError(path, spec.name, "declared twice");
      for (std::int64_t dim : spec.shape)
        if (dim < 0) throw FormatError(path, spec.name, "negative dimension in shape " + shape_string(spec.shape));
      header[spec.name] = {{"dtype", dtype_name(spec.dtype)},
                           {"shape", spec.shape},
                           {"data_offsets", {offset, offset + spec.nbytes()}}};
      offset += spec.nbytes();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data buffer starts 8-aligned
    std::uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = std::uint8_t(std::uint64_t(text.size()) >> (8 * i));
    file_.write(length, 8);
    file_.write(text.data(), text.size());
  }

  // Tensors must be written in declaration order after sorting; writing them in
  // the order of `order()` avoids seeking. Data is contiguous, dtype as declared.
  const std::vector<TensorSpec>& order() const { return specs_; }

  void write(const std::string& name, const void* data, std::uint64_t nbytes) {
    const auto found = position_.find(name);
    if (found == position_.end()) throw FormatError(file_.path(), name, "was not declared");
    if (found->second != next_)
      throw FormatError(file_.path(), name, "written out of order; expected '" +
                                                (next_ < specs_.size() ? specs_[next_].name : std::string("<none>")) + "'");
    if (nbytes != specs_[next_].nbytes())
      throw FormatError(file_.path(), name, "has " + std::to_string(nbytes) + " bytes, declared " +
                                                std::to_string(specs_[next_].nbytes()));
    file_.write(data, nbytes);
    ++next_;
  }

  void commit() {
    if (next_ != specs_.size())
      throw FormatError(file_.path(), specs_[next_].name, "was declared but never written");
    file_.commit();
  }

 private:
  AtomicFileWriter file_;
  std::vector<TensorSpec> specs_;
  std::unordered_map<std::string, std::size_t> position_;
  std::size_t next_ = 0;
};

// A tensor held in memory by the caller, for the one-call writer.
struct TensorData {
  TensorSpec spec;
  const void* data = nullptr;
};

inline void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  std::vector<TensorSpec> specs;
  std::unordered_map<std::string, const void*> data;
  for (const auto& tensor : tensors) {
    specs.push_back(tensor.spec);
    data[tensor.spec.name] = tensor.data;
  }
  SafetensorsWriter writer(path, std::move(specs), metadata);
  for (const TensorSpec& spec : writer.order()) writer.write(spec.name, data[spec.name], spec.nbytes());
  writer.commit();
}

}  // namespace meswitch
