// Helpers shared by the C++ tests: scratch files and hand-built safetensors bytes.
#pragma once

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace meswitch_test {

inline std::string scratch_path(const std::string& name) {
  ::mkdir(MESWITCH_TEST_TMP, 0755);
  return std::string(MESWITCH_TEST_TMP) + "/" + std::to_string(::getpid()) + "_" + name;
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(bytes.data(), std::streamsize(bytes.size()));
}

// A safetensors file with the given JSON header (not padded) followed by `data_bytes` zero bytes.
inline std::string safetensors_bytes(const std::string& header, std::size_t data_bytes,
                                     std::uint64_t declared_header_length = UINT64_MAX) {
  const std::uint64_t length = declared_header_length == UINT64_MAX ? header.size() : declared_header_length;
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = char((length >> (8 * i)) & 0xff);
  bytes += header;
  bytes.append(data_bytes, '\0');
  return bytes;
}

inline bool file_exists(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0;
}

// Temporary files of AtomicFileWriter ("NAME.tmp.XXXXXX") that this process left in the
// scratch directory. Only this process's files (scratch_path prefixes the pid): ctest
// runs test cases in parallel, and another case's writer may be mid-write right now.
inline int temporary_files_left() {
  const std::string mine = std::to_string(::getpid()) + "_";
  int count = 0;
  if (DIR* directory = ::opendir(MESWITCH_TEST_TMP)) {
    while (dirent* entry = ::readdir(directory)) {
      const std::string name = entry->d_name;
      if (name.compare(0, mine.size(), mine) == 0 && name.find(".tmp.") != std::string::npos) ++count;
    }
    ::closedir(directory);
  }
  return count;
}

}  // namespace meswitch_test
