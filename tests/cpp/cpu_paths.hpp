// Which CPU kernel paths a test can run here, shared by the CPU kernel tests.
#pragma once

#include <catch2/catch.hpp>

#include "meswitch/cpu/simd.hpp"

namespace meswitch_test {

// The instructions a path needs beyond baseline x86-64 (simd.hpp, cpu_supports).
inline const char* instructions_of(meswitch::cpu::CpuPath path) {
  using meswitch::cpu::CpuPath;
  switch (path) {
    case CpuPath::Avx2:
    case CpuPath::Avx2Int: return "AVX2/FMA/F16C/BMI2";
    case CpuPath::Avx512: return "AVX-512 F/VL/BW/DQ";
    case CpuPath::Avx512Vnni: return "AVX-512 VNNI/GFNI";
    default: return "nothing";
  }
}

// Catch2 v2 has no skip: a path this CPU lacks prints "SKIPPED: <path>: <reason>" and
// its test case returns; ctest reports such a test as skipped, not passed
// (SKIP_REGULAR_EXPRESSION in tests/cpp/CMakeLists.txt).
inline bool cpu_runs(meswitch::cpu::CpuPath path) {
  if (meswitch::cpu::cpu_supports(path)) return true;
  WARN("SKIPPED: " << meswitch::cpu::cpu_path_name(path) << ": this CPU lacks " << instructions_of(path));
  return false;
}

}  // namespace meswitch_test
