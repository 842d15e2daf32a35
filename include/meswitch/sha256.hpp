// SHA-256, for artifact shard checksums and base-model fingerprints.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace meswitch {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  std::array<std::uint8_t, 32> finish();
  std::string hex_digest();  // finishes the hash

 private:
  void compress(const std::uint8_t* block);
  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
};

inline std::string sha256_hex(const void* data, std::size_t size) {
  Sha256 hash;
  hash.update(data, size);
  return hash.hex_digest();
}

// SHA-256 of a whole file, read through a mapping.
std::string sha256_file(const std::string& path);

}  // namespace meswitch
