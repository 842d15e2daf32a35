// Dense 16-bit GEMM of few tokens (cpu/dense_gemm.hpp) against this machine's limits,
// measured in the same run: the read bandwidth (STREAM-like parallel sums) and the FMA
// rate (independent FMA chains on every thread, vectors as wide as the path's), each the
// best of many short runs; a call's time is its fastest call (bench_support.hpp, time_calls).
// The roofline of a call is the larger of its weight bytes over the read bandwidth and
// its vector FMAs (rows x cols x tokens / lanes) over the FMA rate. Every call rotates
// through enough weight copies to stream its weights from DRAM.
//
//   MESWITCH_NUM_THREADS=2 ./bench_dense_gemm --json dense.json [--quick]
//
// bench_dense_report.py adds PyTorch's float32 and bf16 GEMMs of the same cases.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "meswitch/cpu/dense_gemm.hpp"
#include "meswitch/half.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

using namespace meswitch;
using namespace meswitch::cpu;
using namespace meswitch::bench;

namespace {

#if MESWITCH_X86_KERNELS
constexpr int kChains = 10;  // > FMA latency x FMA units, so the units never wait on a result

// `repeats` x kChains vector FMAs; returns a value that depends on all of them.
MESWITCH_TARGET_AVX2 float fma_chains_avx2(std::int64_t repeats) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-4f);
  for (std::int64_t n = 0; n < repeats; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm256_cvtss_f32(acc[i]);
  return sum;
}

MESWITCH_TARGET_AVX512 float fma_chains_avx512(std::int64_t repeats) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-4f);
  for (std::int64_t n = 0; n < repeats; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_cvtss_f32(acc[i]);
  return sum;
}
#endif

// Vector FMAs per second on `threads` threads, each vector `lanes` wide: the best of 300
// short bursts (1M FMAs per thread), for the same reason as measure_bandwidth.
double measure_fma_rate(int threads, int lanes) {
  const std::int64_t repeats = 100'000;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  double best = 1e9;
  for (int attempt = 0; attempt < 300; ++attempt) {
    const double t0 = now_seconds();
    parallel_for(threads, threads, [&](int, std::int64_t item) {
#if MESWITCH_X86_KERNELS
      sink[std::size_t(item)] = lanes == 8 ? fma_chains_avx2(repeats) : fma_chains_avx512(repeats);
#endif
    });
    best = std::min(best, now_seconds() - t0);
  }
  if (sink[0] == 12345.0f) std::fprintf(stderr, "(unlikely)\n");
  return double(threads) * double(repeats) * kChains / best;
}

struct Row {
  std::string shape, dtype;
  std::int64_t rows = 0, cols = 0, tokens = 0;
  double ms = 0, gbs = 0, roofline_ms = 0;
};

}  // namespace

int main(int argc, char** argv) {
  BenchArguments arguments;
  if (!parse_arguments(argc, argv, arguments)) return 2;
  const std::string& json_path = arguments.json_path;
  const bool quick = arguments.quick;
  const CpuPath requested = resolve_cpu_path();
  const int threads = resolve_num_threads(0);
  if (requested == CpuPath::Reference) {
    std::fprintf(stderr, "the reference path is the spec, not a kernel to benchmark; pick avx2 or avx512\n");
    return 1;
  }
  // The dense GEMM runs avx512vnni as avx512 and avx2int as avx2 (dense_gemm.hpp); name what runs.
  const CpuPath path = requested == CpuPath::Avx512Vnni ? CpuPath::Avx512
                       : requested == CpuPath::Avx2Int  ? CpuPath::Avx2
                                                        : requested;
  const int lanes = path == CpuPath::Avx2 ? 8 : 16;
  const std::string model = cpu_model();
  const Bandwidth bandwidth = measure_bandwidth(threads);
  const double fma_rate = measure_fma_rate(threads, lanes);
  std::printf("CPU: %s; path %s; %d thread(s); read bandwidth %.1f GB/s; %.2f G vector FMAs/s (%d lanes)\n\n",
              model.c_str(), cpu_path_name(path), threads, bandwidth.read_gbs, fma_rate / 1e9, lanes);

  struct Shape { std::int64_t rows, cols; };
  std::vector<Shape> shapes = {{4096, 4096}, {5632, 2048}, {4096, 14336}};
  if (quick) shapes.resize(1);
  KernelOptions options;
  options.num_threads = threads;
  options.path = path;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Row> rows;
  std::printf("| shape (out x in) | weight | tokens | ms | GB/s | %% of read BW | roofline ms | %% of roofline |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& shape : shapes) {
    const std::size_t elements = std::size_t(shape.rows * shape.cols), bytes = elements * 2;
    const int copies = int(std::max<std::size_t>(2, kRotateBytes / bytes + 1));
    for (DType dtype : {DType::BF16, DType::F16}) {
      std::vector<std::vector<std::uint16_t>> weights(static_cast<std::size_t>(copies));
      for (auto& w : weights) {
        w.resize(elements);
        for (auto& v : w) v = dtype == DType::BF16 ? float_to_bf16(0.02f * normal(rng)) : float_to_f16(0.02f * normal(rng));
      }
      for (std::int64_t tokens : {1, 4, 8, 16}) {
        std::vector<float> x(std::size_t(tokens * shape.cols)), y(std::size_t(tokens * shape.rows));
        for (auto& v : x) v = normal(rng);
        const TensorView xv(x.data(), DType::F32, {tokens, shape.cols});
        Row row;
        row.shape = std::to_string(shape.rows) + "x" + std::to_string(shape.cols);
        row.dtype = dtype_name(dtype);
        row.rows = shape.rows;
        row.cols = shape.cols;
        row.tokens = tokens;
        row.ms = 1e3 * time_calls(copies, [&](int i) {
                   const TensorView wv(weights[std::size_t(i)].data(), dtype, {shape.rows, shape.cols});
                   dense_matmul(wv, xv, y.data(), shape.rows, options);
                 }, 0.3, 10, /*fastest=*/true);
        row.gbs = double(bytes) / (row.ms * 1e-3) / 1e9;
        const double memory_s = double(bytes) / (bandwidth.read_gbs * 1e9);
        const double compute_s = double(elements) * double(tokens) / lanes / fma_rate;
        row.roofline_ms = 1e3 * std::max(memory_s, compute_s);
        rows.push_back(row);
        std::printf("| %s | %s | %lld | %.3f | %.1f | %.0f %% | %.3f | %.0f %% |\n", row.shape.c_str(), row.dtype.c_str(),
                    (long long)tokens, row.ms, row.gbs, 100.0 * row.gbs / bandwidth.read_gbs, row.roofline_ms,
                    100.0 * row.roofline_ms / row.ms);
        std::fflush(stdout);
      }
    }
  }
  if (!json_path.empty()) {
    FILE* file = std::fopen(json_path.c_str(), "w");
    if (file == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fprintf(file,
                 "{\"cpu\": \"%s\", \"path\": \"%s\", \"threads\": %d, \"read_gbs\": %.3f, \"copy_gbs\": %.3f, "
                 "\"fma_per_s\": %.4e, \"lanes\": %d, \"rows\": [\n",
                 model.c_str(), cpu_path_name(path), threads, bandwidth.read_gbs, bandwidth.copy_gbs, fma_rate, lanes);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& row = rows[i];
      std::fprintf(file,
                   "  {\"shape\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"dtype\": \"%s\", \"tokens\": %lld, "
                   "\"ms\": %.5f, \"gbs\": %.3f, \"roofline_ms\": %.5f}%s\n",
                   row.shape.c_str(), (long long)row.rows, (long long)row.cols, row.dtype.c_str(), (long long)row.tokens,
                   row.ms, row.gbs, row.roofline_ms, i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(file, "]}\n");
    std::fclose(file);
  }
  return 0;
}
