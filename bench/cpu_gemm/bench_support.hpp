// Timing and memory bandwidth for the CPU GEMM benchmarks (bench_cpu_gemm, bench_dense_gemm).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "meswitch/cpu/simd.hpp"
#include "meswitch/cpu/threading.hpp"

#if MESWITCH_X86_KERNELS
#include <immintrin.h>
#endif

namespace meswitch::bench {

constexpr std::size_t kStreamBytes = std::size_t(1) << 30;
// Weights rotate through copies of at least this many bytes: > 6x the 32 MiB L3 of the
// largest machine we report on, so each call streams its weights from DRAM as in
// serving, where a layer's weights are long evicted by the time it runs again.
constexpr std::size_t kRotateBytes = std::size_t(192) << 20;

struct BenchArguments {
  std::string json_path;  // --json PATH: write the results here
  bool quick = false;     // --quick: the first shape only
  int group = 0;          // --group G: the delta's group size (bench_cpu_gemm; 0: its default)
  bool fastest = false;   // --fastest: a call's time is its fastest call, not the median (bench_cpu_gemm)
};

// False (after printing the usage) for anything else.
inline bool parse_arguments(int argc, char** argv, BenchArguments& out) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      out.json_path = argv[++i];
    } else if (arg == "--quick") {
      out.quick = true;
    } else if (arg == "--group" && i + 1 < argc && std::atoi(argv[i + 1]) > 0) {
      out.group = std::atoi(argv[++i]);
    } else if (arg == "--fastest") {
      out.fastest = true;
    } else {
      std::fprintf(stderr, "usage: %s [--json out.json] [--quick] [--group G] [--fastest]\n", argv[0]);
      return false;
    }
  }
  return true;
}

// The CPU's model name as /proc/cpuinfo (lscpu) gives it.
inline std::string cpu_model() {
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median seconds per call of `call(copy)`, cycling through `copies` weight copies; with
// `fastest`, the fastest call instead (on a shared machine the median also measures the
// neighbours; the fastest call is the one that ran alone).
inline double time_calls(int copies, const std::function<void(int)>& call, double min_seconds = 0.4, int min_calls = 20,
                         bool fastest = false) {
  for (int i = 0; i < copies; ++i) call(i);  // warm-up: page faults, thread start
  std::vector<double> samples;
  const double start = now_seconds();
  for (int i = 0; (now_seconds() - start < min_seconds || int(samples.size()) < min_calls) && i < 100000; ++i) {
    const double t0 = now_seconds();
    call(i % copies);
    samples.push_back(now_seconds() - t0);
  }
  std::sort(samples.begin(), samples.end());
  return fastest ? samples.front() : samples[samples.size() / 2];
}

#if MESWITCH_X86_KERNELS
MESWITCH_TARGET_AVX2 inline float read_sum(const float* data, std::size_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (std::size_t i = 0; i < n; i += 32) {
    a = _mm256_add_ps(a, _mm256_loadu_ps(data + i));
    b = _mm256_add_ps(b, _mm256_loadu_ps(data + i + 8));
    c = _mm256_add_ps(c, _mm256_loadu_ps(data + i + 16));
    d = _mm256_add_ps(d, _mm256_loadu_ps(data + i + 24));
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

struct Bandwidth { double read_gbs, copy_gbs; };

// STREAM-like, on `threads` threads. Read: the best of 48 parallel sums of 32 MiB windows
// of a 1 GiB buffer (each larger than any L3 we run on). Short runs and the best of many,
// because on a shared machine a long run is preempted and would report the neighbours'
// share of the cores instead of the memory's speed. Copy: the best of 5 copies of 1 GiB.
inline Bandwidth measure_bandwidth(int threads) {
  std::vector<float> source(kStreamBytes / sizeof(float), 1.0f), destination(source.size(), 0.0f);
  constexpr std::size_t kWindowBytes = std::size_t(32) << 20;
  const std::int64_t windows = std::int64_t(kStreamBytes / kWindowBytes), chunks = 16;
  const std::size_t per_window = kWindowBytes / sizeof(float), per_chunk = per_window / chunks;
  std::vector<float> sums(static_cast<std::size_t>(chunks));
  double best_read = 1e9, best_copy = 1e9;
  for (int repeat = 0; repeat < 48; ++repeat) {
    const float* window = source.data() + std::size_t(repeat % windows) * per_window;
    const double t0 = now_seconds();
    cpu::parallel_for(chunks, threads, [&](int, std::int64_t i) {
#if MESWITCH_X86_KERNELS
      sums[std::size_t(i)] = read_sum(window + std::size_t(i) * per_chunk, per_chunk);
#endif
    });
    best_read = std::min(best_read, now_seconds() - t0);
  }
  if (sums[0] != float(per_chunk)) std::fprintf(stderr, "read check failed\n");
  const std::size_t copy_chunk = source.size() / 256;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const double t0 = now_seconds();
    cpu::parallel_for(256, threads, [&](int, std::int64_t i) {
      std::memcpy(destination.data() + std::size_t(i) * copy_chunk, source.data() + std::size_t(i) * copy_chunk,
                  copy_chunk * sizeof(float));
    });
    best_copy = std::min(best_copy, now_seconds() - t0);
  }
  // Copy moves each byte twice (read + write); STREAM counts both.
  return {double(kWindowBytes) / best_read / 1e9, 2.0 * double(kStreamBytes) / best_copy / 1e9};
}

}  // namespace meswitch::bench
