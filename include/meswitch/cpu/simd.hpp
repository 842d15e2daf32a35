// Which instruction set a CPU kernel runs with, chosen at run time.
//
// The library is compiled for baseline x86-64 so one binary runs everywhere; the
// fast kernels are compiled per function with __attribute__((target(...))) and only
// called after __builtin_cpu_supports says the CPU has those instructions.
// MESWITCH_CPU_PATH=reference|avx2|avx2int|avx512|avx512vnni forces a path (tests use it to compare
// paths on one machine); asking for a path this CPU lacks is an error, not a
// silent fallback, so a benchmark never reports the wrong kernel.
#pragma once

#include <cstdlib>
#include <string>

#include "meswitch/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define MESWITCH_X86_KERNELS 1
#define MESWITCH_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define MESWITCH_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")))
#define MESWITCH_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,gfni,avx2,fma,f16c,bmi2")))
#else
#define MESWITCH_X86_KERNELS 0
#endif

namespace meswitch::cpu {

// The integer paths multiply 1/2/4-bit codes with x held as one or two int8 digits per
// value (cpu/delta_gemm_digits.hpp: two, the default, keep x within max|x| / 32512 of its
// block, one within / 254); 3-bit deltas on them run the float kernel of the same width.
// Avx512Vnni (AVX-512 VNNI + GFNI: Ice Lake, Zen 4 and later) uses vpdpbusd
// (delta_gemm_vnni.hpp); Avx2Int (any AVX2 CPU, the default where AVX-512 is missing)
// vpmaddubsw + vpmaddwd (delta_gemm_avx2int.hpp). The other paths are float32 throughout,
// and the dense GEMM runs each integer path's float kernel.
enum class CpuPath { Auto, Reference, Avx2, Avx512, Avx512Vnni, Avx2Int };

inline const char* cpu_path_name(CpuPath path) {
  switch (path) {
    case CpuPath::Auto: return "auto";
    case CpuPath::Reference: return "reference";
    case CpuPath::Avx2: return "avx2";
    case CpuPath::Avx512: return "avx512";
    case CpuPath::Avx512Vnni: return "avx512vnni";
    case CpuPath::Avx2Int: return "avx2int";
  }
  return "?";
}

inline CpuPath parse_cpu_path(const std::string& name) {
  if (name == "auto") return CpuPath::Auto;
  if (name == "reference") return CpuPath::Reference;
  if (name == "avx2") return CpuPath::Avx2;
  if (name == "avx512") return CpuPath::Avx512;
  if (name == "avx512vnni") return CpuPath::Avx512Vnni;
  if (name == "avx2int") return CpuPath::Avx2Int;
  throw Error("unknown CPU kernel path '" + name + "' (expected reference, avx2, avx2int, avx512, avx512vnni or auto)");
}

#if MESWITCH_X86_KERNELS
// F16C straight from CPUID leaf 1 (clang 14's __builtin_cpu_supports does not know
// "f16c"), asked once: CPUID traps to the hypervisor in a VM and costs microseconds.
inline bool cpu_has_f16c() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
  }();
  return has;
}
#endif

inline bool cpu_supports(CpuPath path) {
  switch (path) {
    case CpuPath::Auto:
    case CpuPath::Reference: return true;
#if MESWITCH_X86_KERNELS
    case CpuPath::Avx2:
    case CpuPath::Avx2Int:  // vpmaddubsw and vpmaddwd are AVX2
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
             __builtin_cpu_supports("bmi2");
    case CpuPath::Avx512:
      return cpu_supports(CpuPath::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq");
    case CpuPath::Avx512Vnni:
      return cpu_supports(CpuPath::Avx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("gfni");
#else
    case CpuPath::Avx2:
    case CpuPath::Avx2Int:
    case CpuPath::Avx512:
    case CpuPath::Avx512Vnni: return false;
#endif
  }
  return false;
}

inline CpuPath best_cpu_path() {
  if (cpu_supports(CpuPath::Avx512Vnni)) return CpuPath::Avx512Vnni;
  // AVX-512 without VNNI (Skylake-X) keeps its float kernel: the AVX2 integer path was
  // measured only against the float AVX2 kernel, on a CPU without AVX-512.
  if (cpu_supports(CpuPath::Avx512)) return CpuPath::Avx512;
  if (cpu_supports(CpuPath::Avx2Int)) return CpuPath::Avx2Int;
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
