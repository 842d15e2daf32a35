// SHA-256, for artifact shard checksums and base-model fingerprints.
//
// Two implementations of the compression function: the portable one (FIPS 180-4
// transcribed) and one with the x86 SHA extensions (SHA-NI: Goldmont, Ice Lake, Zen
// and later), about six times faster, which is what makes verifying a shard cost about
// as much as reading it. Sha256Kernel::Auto picks SHA-NI when CPUID reports it; the
// tests run both on the same inputs against hashlib.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace meswitch {

enum class Sha256Kernel { Auto, Portable, ShaNi };

// Whether this CPU (and build) can run `kernel`; Auto and Portable always can.
bool sha256_kernel_supported(Sha256Kernel kernel);

// "portable" or "sha-ni": what Auto runs on this CPU.
const char* sha256_kernel_name(Sha256Kernel kernel = Sha256Kernel::Auto);

class Sha256 {
 public:
  // Throws Error when `kernel` is one this CPU cannot run.
  explicit Sha256(Sha256Kernel kernel = Sha256Kernel::Auto);
  void update(const void* data, std::size_t size);
  std::array<std::uint8_t, 32> finish();
  std::string hex_digest();  // finishes the hash

 private:
  void compress(const std::uint8_t* blocks, std::size_t count);
  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
  bool sha_ni_ = false;
};

inline std::string sha256_hex(const void* data, std::size_t size, Sha256Kernel kernel = Sha256Kernel::Auto) {
  Sha256 hash(kernel);
  hash.update(data, size);
  return hash.hex_digest();
}

// SHA-256 of a whole file, read through a mapping.
std::string sha256_file(const std::string& path);

}  // namespace meswitch
