// Read-only access to a whole file through mmap, and atomic replacement of files.
//
// Checkpoints are read by mapping them: tensors are then views into the page
// cache, nothing is copied until a consumer touches the bytes, and many readers
// share one copy. The mapping is private copy-on-write, so a consumer that writes
// into a view (a torch tensor made through DLPack, say) changes its own pages and
// never the file, and never faults.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace meswitch {

// Which file, in which state: equal identities mean the same inode unchanged since (any
// write or metadata change moves ctime, which user space cannot set back).
struct FileIdentity {
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  std::uint64_t size = 0;
  std::int64_t modified_ns = 0;
  std::int64_t changed_ns = 0;
  bool operator==(const FileIdentity& other) const {
    return device == other.device && inode == other.inode && size == other.size &&
           modified_ns == other.modified_ns && changed_ns == other.changed_ns;
  }
  bool operator!=(const FileIdentity& other) const { return !(*this == other); }
};

// The identity of whatever is at `path` now, without following a final symbolic link
// (a link has its own); nothing when there is nothing there.
std::optional<FileIdentity> identity_at(const std::string& path);

// Each piece of a file as MappedFile::read copies it in, in order, while it is still in
// cache: hashing there costs no second pass over memory.
using ReadChunkSink = std::function<void(const std::uint8_t* data, std::size_t size)>;

// How far past the piece at hand MappedFile::read with a sink asks the kernel to read
// ahead (POSIX_FADV_WILLNEED), so the disk works while the sink does.
inline constexpr std::size_t kReadAheadBytes = std::size_t(8) << 20;

class MappedFile {
 public:
  // Throws IoError naming the path when the file cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);

  // The whole file read into anonymous, page-aligned memory this object owns. Unlike a
  // file mapping, the bytes are resident once this returns (the kernel cannot drop them
  // and re-read the file later, only swap them), they are exactly the bytes read even if
  // the file is replaced afterwards, and the buffer can be registered as pinned memory
  // for copies to a device. Throws IoError naming the path, also when the file changed
  // while it was read.
  //
  // `sink` sees every byte as it is read (see ReadChunkSink). `recycle`, when given, is a
  // buffer of an earlier read() nobody holds any more (the expert store passes those of
  // the experts it just evicted): its pages, already made, are resized to this file and
  // filled instead of new pages being made and zeroed, which costs more than the copy
  // itself. A recycled buffer still shared, or not from read(), is simply not used.
  static std::shared_ptr<MappedFile> read(const std::string& path, const ReadChunkSink& sink = {},
                                          std::shared_ptr<MappedFile> recycle = nullptr);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::uint8_t* mutable_data() const { return data_; }  // private mapping: writes never reach disk
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // The file as it was when mapped or read.
  const FileIdentity& identity() const { return identity_; }
  // Made by read(): memory this object owns rather than a mapping of the file.
  bool owns_memory() const { return owned_; }
  // Made by read() in the pages of a recycled buffer.
  bool recycled() const { return recycled_; }

  // Drops the pages of [offset, offset + size) from this process's memory (they are
  // re-read from the file if touched again), so streaming through a checkpoint
  // larger than RAM keeps the resident set small.
  void release(std::size_t offset, std::size_t size) const;

 private:
  MappedFile(std::string path, std::uint8_t* data, std::size_t size, FileIdentity identity, bool owned,
             bool recycled = false)
      : path_(std::move(path)), data_(data), size_(size), identity_(identity), owned_(owned), recycled_(recycled) {}

  std::string path_;
  std::uint8_t* data_;
  std::size_t size_;
  FileIdentity identity_;
  bool owned_;
  bool recycled_;
};

// Writes a file under a temporary name in the destination's directory and renames
// it into place on commit(), so readers see either the old file or the complete
// new one. Destroying an uncommitted AtomicFileWriter removes the temporary file:
// an exception or a crash mid-write never leaves a half-written file at `path`.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, std::size_t size);
  void write_zeros(std::size_t size);
  std::uint64_t bytes_written() const { return bytes_written_; }
  // fsync, then rename over the destination.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temporary_path() const { return temporary_path_; }

 private:
  std::string path_;
  std::string temporary_path_;
  int fd_ = -1;
  std::uint64_t bytes_written_ = 0;
  bool committed_ = false;
};

}  // namespace meswitch
