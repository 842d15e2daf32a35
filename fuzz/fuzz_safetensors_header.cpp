// Any byte string is either a valid header or a FormatError; nothing else may escape,
// and a header that validates must describe byte ranges inside the buffer.
#include <cstdint>
#include <cstdlib>

#include "meswitch/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const meswitch::SafetensorsHeader header = meswitch::parse_safetensors_header(data, size, size, "fuzz");
    for (const auto& tensor : header.tensors) {
      if (header.data_start + tensor.end > size || tensor.begin > tensor.end) std::abort();
    }
  } catch (const meswitch::FormatError&) {
  }
  return 0;
}
