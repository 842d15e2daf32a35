#include "meswitch/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "meswitch/error.hpp"

namespace meswitch {

namespace {

std::string system_error(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

FileIdentity identity_of(const struct stat& info) {
  return {std::uint64_t(info.st_dev), std::uint64_t(info.st_ino), std::uint64_t(info.st_size),
          std::int64_t(info.st_mtim.tv_sec) * 1000000000 + info.st_mtim.tv_nsec,
          std::int64_t(info.st_ctim.tv_sec) * 1000000000 + info.st_ctim.tv_nsec};
}

}  // namespace

std::optional<FileIdentity> identity_at(const std::string& path) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return std::nullopt;
  return identity_of(info);
}

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(system_error("cannot open", path));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const std::string message = system_error("cannot stat", path);
    ::close(fd);
    throw IoError(message);
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    throw IoError("not a regular file: '" + path + "'");
  }
  const auto size = static_cast<std::size_t>(info.st_size);
  std::uint8_t* data = nullptr;
  if (size > 0) {
    void* mapping = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      const std::string message = system_error("cannot mmap", path);
      ::close(fd);
      throw IoError(message);
    }
    data = static_cast<std::uint8_t*>(mapping);
  }
  ::close(fd);  // the mapping keeps the file alive
  return std::shared_ptr<MappedFile>(new MappedFile(path, data, size, identity_of(info), /*owned=*/false));
}

std::shared_ptr<MappedFile> MappedFile::read(const std::string& path, const ReadChunkSink& sink,
                                             std::shared_ptr<MappedFile> recycle) {
  // The recycled buffer's memory, taken only from its last owner: nobody else can reach
  // it then. (The acquire fence pairs with the release in the other owners' shared_ptr
  // destructors, so their last reads of the old bytes happen before these writes.)
  std::uint8_t* spare = nullptr;
  std::size_t spare_size = 0;
  if (recycle && recycle.use_count() == 1 && recycle->owned_ && recycle->data_ != nullptr) {
    std::atomic_thread_fence(std::memory_order_acquire);
    spare = std::exchange(recycle->data_, nullptr);
    spare_size = std::exchange(recycle->size_, 0);
  }
  recycle.reset();
  const auto drop_spare = [&] {
    if (spare != nullptr) ::munmap(spare, spare_size);
    spare = nullptr;
  };

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const std::string message = system_error("cannot open", path);
    drop_spare();
    throw IoError(message);
  }
  struct stat info {};
  const bool stated = ::fstat(fd, &info) == 0;
  if (!stated || !S_ISREG(info.st_mode)) {
    const std::string message = stated ? "not a regular file: '" + path + "'" : system_error("cannot stat", path);
    ::close(fd);
    drop_spare();
    throw IoError(message);
  }
  const auto size = static_cast<std::size_t>(info.st_size);
  std::uint8_t* data = nullptr;
  bool recycled = false;
  if (size > 0 && spare != nullptr) {
    // The spare's pages resized to this file (the kernel moves or trims the mapping; the
    // pages kept are not zeroed again). Every byte up to `size` is overwritten below.
    const std::size_t page = std::size_t(::sysconf(_SC_PAGESIZE));
    const auto pages = [page](std::size_t bytes) { return (bytes + page - 1) / page * page; };
    void* moved = pages(spare_size) == pages(size) ? spare
                                                   : ::mremap(spare, pages(spare_size), pages(size), MREMAP_MAYMOVE);
    if (moved != MAP_FAILED) {
      data = static_cast<std::uint8_t*>(moved);
      spare = nullptr;
      recycled = true;
    }
  }
  drop_spare();
  if (size > 0 && data == nullptr) {
    // mmap of anonymous memory: page-aligned, and released by the same munmap as a file mapping.
    // MAP_POPULATE: the pages are made in one call rather than faulted in one by one by the read.
    void* memory = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (memory == MAP_FAILED) {
      const std::string message = system_error("cannot allocate " + std::to_string(size) + " bytes for", path);
      ::close(fd);
      throw IoError(message);
    }
    data = static_cast<std::uint8_t*>(memory);
  }
  if (size > 0) {
    // With a sink, pieces small enough to still be in cache when it sees them. Reading
    // ahead (WILLNEED) a window past the piece at hand keeps the disk busy meanwhile: a
    // file not in the page cache then costs about the slower of reading and the sink.
    constexpr std::size_t kPiece = std::size_t(1) << 20, kAhead = kReadAheadBytes;
    const std::size_t piece = sink ? kPiece : size;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if (sink) ::posix_fadvise(fd, 0, off_t(std::min(size, kAhead)), POSIX_FADV_WILLNEED);
    std::size_t done = 0;
    while (done < size) {
      const std::size_t want = std::min(piece, size - done);
      std::size_t got_piece = 0;
      while (got_piece < want) {
        const ssize_t got = ::pread(fd, data + done + got_piece, want - got_piece, off_t(done + got_piece));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
          const std::string message = got < 0 ? system_error("cannot read", path)
                                              : "'" + path + "' ended after " + std::to_string(done + got_piece) +
                                                    " of " + std::to_string(size) + " bytes (changed while read)";
          ::munmap(data, size);
          ::close(fd);
          throw IoError(message);
        }
        got_piece += std::size_t(got);
      }
      if (sink) {
        if (done + kAhead < size)
          ::posix_fadvise(fd, off_t(done + kAhead), off_t(std::min(want, size - done - kAhead)), POSIX_FADV_WILLNEED);
        sink(data + done, want);
      }
      done += want;
    }
  }
  // A write during the read would leave a mix of old and new bytes under the old identity.
  struct stat after {};
  const bool unchanged = ::fstat(fd, &after) == 0 && identity_of(after) == identity_of(info);
  ::close(fd);
  if (!unchanged) {
    if (data != nullptr) ::munmap(data, size);
    throw IoError("'" + path + "' changed while it was read");
  }
  return std::shared_ptr<MappedFile>(new MappedFile(path, data, size, identity_of(info), /*owned=*/true, recycled));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

void MappedFile::release(std::size_t offset, std::size_t size) const {
  if (data_ == nullptr || size == 0 || offset >= size_) return;
  const std::size_t page = std::size_t(::sysconf(_SC_PAGESIZE));
  // Only whole pages inside the range: neighbours sharing a page stay resident.
  const std::size_t begin = (offset + page - 1) / page * page;
  const std::size_t end = std::min(offset + size, size_) / page * page;
  if (end > begin) ::madvise(data_ + begin, end - begin, MADV_DONTNEED);
}

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  std::vector<char> pattern(path_.begin(), path_.end());
  const char suffix[] = ".tmp.XXXXXX";
  pattern.insert(pattern.end(), suffix, suffix + sizeof suffix);  // includes the NUL
  fd_ = ::mkstemp(pattern.data());
  if (fd_ < 0) throw IoError(system_error("cannot create a temporary file for", path_));
  temporary_path_ = pattern.data();
  ::fchmod(fd_, 0644);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temporary_path_.c_str());
}

void AtomicFileWriter::write(const void* data, std::size_t size) {
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t written = ::write(fd_, bytes, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      throw IoError(system_error("cannot write", temporary_path_));
    }
    bytes += written;
    size -= static_cast<std::size_t>(written);
    bytes_written_ += static_cast<std::uint64_t>(written);
  }
}

void AtomicFileWriter::write_zeros(std::size_t size) {
  static const std::uint8_t zeros[4096] = {};
  while (size > 0) {
    const std::size_t chunk = size < sizeof zeros ? size : sizeof zeros;
    write(zeros, chunk);
    size -= chunk;
  }
}

void AtomicFileWriter::commit() {
  if (committed_) throw Error("AtomicFileWriter: '" + path_ + "' already committed");
  if (::fsync(fd_) != 0) throw IoError(system_error("cannot fsync", temporary_path_));
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw IoError(system_error("cannot close", temporary_path_));
  }
  fd_ = -1;
  if (::rename(temporary_path_.c_str(), path_.c_str()) != 0)
    throw IoError(system_error("cannot rename into", path_));
  committed_ = true;
}

}  // namespace meswitch
