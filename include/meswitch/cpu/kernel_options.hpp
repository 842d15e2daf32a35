// Settings every CPU kernel call takes (delta GEMM, dense GEMM): threads, instruction-set
// path, rows per work item, and the delta kernel's VNNI activation digits.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "meswitch/cpu/simd.hpp"
#include "meswitch/error.hpp"

namespace meswitch::cpu {

struct KernelOptions {
  int num_threads = 0;              // 0: MESWITCH_NUM_THREADS, else hardware threads
  CpuPath path = CpuPath::Auto;     // Auto: MESWITCH_CPU_PATH, else the best this CPU has
  std::int64_t row_tile = 0;        // output rows per work item; 0 picks 16
  // VNNI path only: x as 1 int8 digit (within max|x| / 254 of its block) or 2 (within
  // max|x| / 32512); 0: MESWITCH_ACTIVATION_DIGITS, else 2.
  int activation_digits = 0;
};

// `requested` (1 or 2) wins over MESWITCH_ACTIVATION_DIGITS, which wins over 2.
inline int resolve_activation_digits(int requested) {
  if (requested == 0) {
    const char* text = std::getenv("MESWITCH_ACTIVATION_DIGITS");
    if (text == nullptr || *text == '\0') return 2;
    if (std::string(text) != "1" && std::string(text) != "2")
      throw Error(std::string("MESWITCH_ACTIVATION_DIGITS='") + text + "' must be 1 or 2");
    return text[0] - '0';
  }
  if (requested != 1 && requested != 2)
    throw Error("activation_digits must be 0 (default), 1 or 2, got " + std::to_string(requested));
  return requested;
}

}  // namespace meswitch::cpu
