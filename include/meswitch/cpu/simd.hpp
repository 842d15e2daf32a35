// Which instruction set a CPU kernel runs with, chosen at run time.
//
// The library is compiled for baseline x86-64 so one binary runs everywhere; the
// fast kernels are compiled per function with __attribute__((target(...))) and only
// called after __builtin_cpu_supports says the CPU has those instructions.
// MESWITCH_CPU_PATH=reference|avx2|avx512 forces a path (tests use it to compare
// paths on one machine); asking for a path this CPU lacks is an error, not a
// silent fallback, so a benchmark never reports the wrong kernel.
#pragma once

#include <cstdlib>
#include <string>

#include "meswitch/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MESWITCH_X86_KERNELS 1
#define MESWITCH_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define MESWITCH_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")))
#else
#define MESWITCH_X86_KERNELS 0
#endif

namespace meswitch::cpu {

enum class CpuPath { Auto, Reference, Avx2, Avx512 };

inline const char* cpu_path_name(CpuPath path) {
  switch (path) {
    case CpuPath::Auto: return "auto";
    case CpuPath::Reference: return "reference";
    case CpuPath::Avx2: return "avx2";
    case CpuPath::Avx512: return "avx512";
  }
  return "?";
}

inline CpuPath parse_cpu_path(const std::string& name) {
  if (name == "auto") return CpuPath::Auto;
  if (name == "reference") return CpuPath::Reference;
  if (name == "avx2") return CpuPath::Avx2;
  if (name == "avx512") return CpuPath::Avx512;
  throw Error("unknown CPU kernel path '" + name + "' (expected reference, avx2, avx512 or auto)");
}

inline bool cpu_supports(CpuPath path) {
  switch (path) {
    case CpuPath::Auto:
    case CpuPath::Reference: return true;
#if MESWITCH_X86_KERNELS
    case CpuPath::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case CpuPath::Avx512:
      return cpu_supports(CpuPath::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq");
#else
    case CpuPath::Avx2:
    case CpuPath::Avx512: return false;
#endif
  }
  return false;
}

inline CpuPath best_cpu_path() {
  if (cpu_supports(CpuPath::Avx512)) return CpuPath::Avx512;
  if (cpu_supports(CpuPath::Avx2)) return CpuPath::Avx2;
  return CpuPath::Reference;
}

// `requested` (from KernelOptions) wins over MESWITCH_CPU_PATH, which wins over
// the best path of this CPU. Never returns Auto.
inline CpuPath resolve_cpu_path(CpuPath requested = CpuPath::Auto) {
  CpuPath path = requested;
  std::string source = "KernelOptions::path";
  if (path == CpuPath::Auto) {
    if (const char* text = std::getenv("MESWITCH_CPU_PATH"); text != nullptr && *text != '\0') {
      path = parse_cpu_path(text);
      source = "MESWITCH_CPU_PATH";
    }
  }
  if (path == CpuPath::Auto) return best_cpu_path();
  if (!cpu_supports(path))
    throw Error(source + " asks for the " + cpu_path_name(path) + " kernels, which this CPU does not support");
  return path;
}

}  // namespace meswitch::cpu
