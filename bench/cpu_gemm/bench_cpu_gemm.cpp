// Fused CPU delta GEMM against baselines measured in the same run:
//   (a) a dense bf16 GEMV/GEMM of the same shape, the faster of two: a plain loop here
//       (bf16 weights widened to float on the fly, AVX-512 BF16 where the CPU has it;
//       same threads and row tiling as the delta kernel) and the project's dense kernel
//       (cpu/dense_gemm.hpp, meswitch.ops.dense_matmul);
//   (b) memory bandwidth: a STREAM-like parallel read (sum) and copy of 1 GiB.
// Every kernel cycles through enough copies of its weights to exceed the last-level
// cache, so each call streams its weights from DRAM as in serving, where a layer's
// weights are long evicted by the time it runs again.
//
//   MESWITCH_NUM_THREADS=1 ./bench_cpu_gemm [--json out.json] [--quick] [--group G] [--fastest]
//
// --group: the delta's group size (default 64); --fastest: every time is a case's fastest
// call instead of its median (on a shared machine the median also measures the neighbours).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "meswitch/cpu/delta_gemm.hpp"
#include "meswitch/cpu/dense_gemm.hpp"

// GCC 12's false -Wmaybe-uninitialized inside AVX-512 intrinsics (see delta_gemm_x86.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

using namespace meswitch;
using namespace meswitch::cpu;
using namespace meswitch::bench;

namespace {

// ---------------------------------------------------------------- dense bf16 baseline

#if MESWITCH_X86_KERNELS
template <int TB>
MESWITCH_TARGET_AVX512 void dense_row_avx512(const std::uint16_t* w, const float* x, std::int64_t cols, float* y,
                                             std::int64_t y_stride) {
  __m512 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (std::int64_t c = 0; c < cols; c += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + 512), _MM_HINT_T0);
    // bf16 -> f32 is a 16-bit left shift of the widened integer.
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c))), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c + 16))), 16));
    for (int t = 0; t < TB; ++t) {
      acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * cols + c), acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * cols + c + 16), acc[t][1]);
    }
  }
  for (int t = 0; t < TB; ++t) y[t * y_stride] += _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

// With AVX512-BF16: 32 bf16 products per instruction (vdpbf16ps) on x rounded to bf16,
// what a bf16 GEMM library does on this CPU; twice the float FMA loop's work per
// instruction, which matters once several tokens make the dense GEMM compute-bound.
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dense_row_avx512bf16(const std::uint16_t* w,
                                                                                const std::uint16_t* x, std::int64_t cols,
                                                                                float* y, std::int64_t y_stride) {
  __m512 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (std::int64_t c = 0; c < cols; c += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + 512), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + c), w1 = (__m512bh)_mm512_loadu_si512(w + c + 32);
    for (int t = 0; t < TB; ++t) {
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, (__m512bh)_mm512_loadu_si512(x + t * cols + c));
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, (__m512bh)_mm512_loadu_si512(x + t * cols + c + 32));
    }
  }
  for (int t = 0; t < TB; ++t) y[t * y_stride] += _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

bool has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16") && cpu_supports(CpuPath::Avx512); }

template <int TB>
MESWITCH_TARGET_AVX2 void dense_row_avx2(const std::uint16_t* w, const float* x, std::int64_t cols, float* y,
                                         std::int64_t y_stride) {
  __m256 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (std::int64_t c = 0; c < cols; c += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c + 512), _MM_HINT_T0);
    const __m256 w0 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c))), 16));
    const __m256 w1 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 8))), 16));
    for (int t = 0; t < TB; ++t) {
      acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * cols + c), acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * cols + c + 8), acc[t][1]);
    }
  }
  for (int t = 0; t < TB; ++t) y[t * y_stride] += cpu::detail::avx2_reduce_add(_mm256_add_ps(acc[t][0], acc[t][1]));
}

// Which dense loop the baseline runs: the fastest this CPU has.
enum class DenseKernel { Avx2, Avx512, Avx512Bf16 };

DenseKernel best_dense_kernel(CpuPath path) {
  if (path == CpuPath::Avx2 || path == CpuPath::Avx2Int) return DenseKernel::Avx2;
  return has_avx512_bf16() ? DenseKernel::Avx512Bf16 : DenseKernel::Avx512;
}

const char* dense_kernel_name(DenseKernel kernel) {
  switch (kernel) {
    case DenseKernel::Avx2: return "AVX2 FMA on bf16 widened to f32";
    case DenseKernel::Avx512: return "AVX-512 FMA on bf16 widened to f32";
    case DenseKernel::Avx512Bf16: return "AVX512-BF16 vdpbf16ps, x rounded to bf16";
  }
  return "?";
}

// y[T, rows] += x[T, cols] @ W^T, W bf16 [rows, cols], cols a multiple of 64.
void dense_bf16_matmul(DenseKernel kernel, int threads, const std::uint16_t* w, std::int64_t rows, std::int64_t cols,
                       const float* x, std::int64_t tokens, float* y, std::int64_t y_stride) {
  const std::int64_t tile = 16;
  std::vector<std::uint16_t> x_bf16;  // the bf16 loop multiplies bf16 activations, as a bf16 GEMM does
  if (kernel == DenseKernel::Avx512Bf16) {
    x_bf16.resize(std::size_t(tokens * cols));
    for (std::size_t i = 0; i < x_bf16.size(); ++i) x_bf16[i] = float_to_bf16(x[i]);
  }
  parallel_for((rows + tile - 1) / tile, threads, [&](int, std::int64_t item) {
    for (std::int64_t r = item * tile; r < std::min(rows, (item + 1) * tile); ++r) {
      for (std::int64_t t0 = 0; t0 < tokens; t0 += 4) {
        const std::int64_t n = std::min<std::int64_t>(4, tokens - t0);
        const std::uint16_t* row = w + r * cols;
        const float* xt = x + t0 * cols;
        float* yt = y + t0 * y_stride + r;
        if (kernel == DenseKernel::Avx512Bf16) {
          const std::uint16_t* xb = x_bf16.data() + t0 * cols;
          switch (n) {
            case 1: dense_row_avx512bf16<1>(row, xb, cols, yt, y_stride); break;
            case 2: dense_row_avx512bf16<2>(row, xb, cols, yt, y_stride); break;
            case 3: dense_row_avx512bf16<3>(row, xb, cols, yt, y_stride); break;
            default: dense_row_avx512bf16<4>(row, xb, cols, yt, y_stride); break;
          }
        } else if (kernel == DenseKernel::Avx512) {
          switch (n) {
            case 1: dense_row_avx512<1>(row, xt, cols, yt, y_stride); break;
            case 2: dense_row_avx512<2>(row, xt, cols, yt, y_stride); break;
            case 3: dense_row_avx512<3>(row, xt, cols, yt, y_stride); break;
            default: dense_row_avx512<4>(row, xt, cols, yt, y_stride); break;
          }
        } else {
          switch (n) {
            case 1: dense_row_avx2<1>(row, xt, cols, yt, y_stride); break;
            case 2: dense_row_avx2<2>(row, xt, cols, yt, y_stride); break;
            case 3: dense_row_avx2<3>(row, xt, cols, yt, y_stride); break;
            default: dense_row_avx2<4>(row, xt, cols, yt, y_stride); break;
          }
        }
      }
    }
  });
}

#endif

// ---------------------------------------------------------------- random deltas

struct DeltaStorage {
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint16_t> scales, salient;
  std::vector<std::uint8_t> zeros;
  std::vector<std::int32_t> salient_idx;
  CompressedDelta view;
  std::size_t bytes = 0;
};

DeltaStorage random_delta(std::int64_t rows, std::int64_t cols, int bits, std::int64_t group, std::int64_t k, unsigned seed) {
  std::mt19937 rng(seed);
  DeltaStorage d;
  const std::int64_t words = (cols * bits + 31) / 32, groups = cols / group;
  d.qweight.resize(std::size_t(rows * words));
  for (auto& w : d.qweight) w = rng();
  d.scales.resize(std::size_t(rows * groups));
  std::uniform_real_distribution<float> scale(0.0005f, 0.002f);
  for (auto& s : d.scales) s = float_to_f16(scale(rng));
  d.zeros.resize(std::size_t(rows * groups));
  for (auto& z : d.zeros) z = std::uint8_t(rng() % (1u << bits));
  std::vector<std::int32_t> all(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) all[std::size_t(c)] = std::int32_t(c);
  std::shuffle(all.begin(), all.end(), rng);
  d.salient_idx.assign(all.begin(), all.begin() + k);
  std::sort(d.salient_idx.begin(), d.salient_idx.end());
  d.salient.resize(std::size_t(rows * k));
  for (auto& s : d.salient) s = float_to_f16(scale(rng) * 10);
  d.view = CompressedDelta::over_views("bench", rows, cols, bits, group, k,
                                       TensorView(d.qweight.data(), DType::U32, {rows, words}),
                                       TensorView(d.scales.data(), DType::F16, {rows, groups}),
                                       TensorView(d.zeros.data(), DType::U8, {rows, groups}),
                                       TensorView(d.salient_idx.data(), DType::I32, {k}),
                                       TensorView(d.salient.data(), DType::F16, {rows, k}));
  d.bytes = d.qweight.size() * 4 + d.scales.size() * 2 + d.zeros.size() + d.salient.size() * 2 + d.salient_idx.size() * 4;
  return d;
}

struct Row {
  std::string kind, shape;
  int bits = 0;
  std::int64_t tokens = 0;
  double delta_ms = 0, loop_ms = 0, dense_gemm_ms = 0, delta_gbs = 0;
  // The faster dense baseline (the loop here or dense_matmul) and its bandwidth.
  double dense_ms() const { return std::min(loop_ms, dense_gemm_ms); }
  double dense_gbs = 0;
};

}  // namespace

int main(int argc, char** argv) {
  BenchArguments arguments;
  if (!parse_arguments(argc, argv, arguments)) return 2;
  const std::string& json_path = arguments.json_path;
  const bool quick = arguments.quick;
  const std::int64_t group = arguments.group > 0 ? arguments.group : 64;
  const auto time_ms = [&](int copies, const std::function<void(int)>& call) {
    return 1e3 * time_calls(copies, call, 0.4, 20, arguments.fastest);
  };
  const CpuPath path = resolve_cpu_path();
  const int threads = resolve_num_threads(0);
#if !MESWITCH_X86_KERNELS
  std::fprintf(stderr, "this benchmark needs an x86-64 CPU with AVX2\n");
  return 1;
#else
  if (path == CpuPath::Reference) {
    std::fprintf(stderr, "the dense baseline needs AVX2; MESWITCH_CPU_PATH=reference is not benchmarked\n");
    return 1;
  }
  const Bandwidth bandwidth = measure_bandwidth(threads);
  const int digits = resolve_activation_digits(0);
  const DenseKernel dense_kernel = best_dense_kernel(path);
  const std::string model = cpu_model();
  std::printf("CPU: %s; delta: path %s (activation digits %d), group %lld; dense baselines: %s and dense_matmul; "
              "threads %d; read bandwidth %.1f GB/s, copy bandwidth %.1f GB/s; times: %s\n\n",
              model.c_str(), cpu_path_name(path), digits, (long long)group, dense_kernel_name(dense_kernel), threads,
              bandwidth.read_gbs, bandwidth.copy_gbs, arguments.fastest ? "fastest call" : "median call");

  struct Shape { std::int64_t rows, cols; };
  std::vector<Shape> shapes = {{4096, 4096}, {14336, 4096}, {4096, 14336}};
  if (quick) shapes.resize(1);
  std::vector<Row> rows;
  KernelOptions options;
  options.num_threads = threads;
  options.path = path;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);

  for (const Shape& shape : shapes) {
    const std::string name = std::to_string(shape.rows) + "x" + std::to_string(shape.cols);
    const std::int64_t k = shape.cols / 100;  // 1 % salient channels
    // Dense bf16 weights, enough copies to defeat the cache.
    const std::size_t dense_bytes = std::size_t(shape.rows * shape.cols) * 2;
    const int dense_copies = int(std::max<std::size_t>(2, kRotateBytes / dense_bytes + 1));
    std::vector<std::vector<std::uint16_t>> dense(static_cast<std::size_t>(dense_copies));
    for (auto& w : dense) {
      w.resize(std::size_t(shape.rows * shape.cols));
      for (auto& v : w) v = float_to_bf16(normal(rng) * 0.02f);
    }
    for (int bits : {2, 4}) {
      const DeltaStorage probe = random_delta(shape.rows, shape.cols, bits, group, k, 1);
      const int delta_copies = int(std::max<std::size_t>(2, kRotateBytes / probe.bytes + 1));
      std::vector<DeltaStorage> deltas;
      for (int i = 0; i < delta_copies; ++i) deltas.push_back(random_delta(shape.rows, shape.cols, bits, group, k, unsigned(100 + i)));
      for (std::int64_t tokens : {1, 4, 16}) {
        if (bits == 4 && tokens != 1) continue;
        std::vector<float> x(std::size_t(tokens * shape.cols)), y(std::size_t(tokens * shape.rows), 0.0f);
        for (auto& v : x) v = normal(rng);
        const TensorView xv(x.data(), DType::F32, {tokens, shape.cols});
        Row row;
        row.kind = "single";
        row.shape = name;
        row.bits = bits;
        row.tokens = tokens;
        row.delta_ms = time_ms(delta_copies, [&](int i) { delta_matmul(deltas[std::size_t(i)].view, xv, y.data(), shape.rows, options); });
        row.loop_ms = time_ms(dense_copies, [&](int i) {
          dense_bf16_matmul(dense_kernel, threads, dense[std::size_t(i)].data(), shape.rows, shape.cols, x.data(), tokens, y.data(), shape.rows);
        });
        row.dense_gemm_ms = time_ms(dense_copies, [&](int i) {
          dense_matmul(TensorView(dense[std::size_t(i)].data(), DType::BF16, {shape.rows, shape.cols}), xv, y.data(),
                       shape.rows, options);
        });
        row.delta_gbs = double(probe.bytes) / (row.delta_ms * 1e-3) / 1e9;
        row.dense_gbs = double(dense_bytes) / (row.dense_ms() * 1e-3) / 1e9;
        rows.push_back(row);
        std::fprintf(stderr, "%s %d-bit T=%lld: delta %.3f ms, dense loop %.3f ms, dense_matmul %.3f ms\n", name.c_str(),
                     bits, (long long)tokens, row.delta_ms, row.loop_ms, row.dense_gemm_ms);
      }
      if (bits == 2) {
        // 8 tokens over 4 experts (2 each): one multi_delta_matmul vs four dense GEMMs
        // of 2 tokens, each expert with its own weights.
        const std::int64_t tokens = 8;
        std::vector<float> x(std::size_t(tokens * shape.cols)), y(std::size_t(tokens * shape.rows), 0.0f);
        for (auto& v : x) v = normal(rng);
        const TensorView xv(x.data(), DType::F32, {tokens, shape.cols});
        const std::vector<std::int64_t> starts = {0, 2, 4, 6, 8};
        const int groups_of_four = std::max(1, delta_copies / 4);
        Row row;
        row.kind = "multi";
        row.shape = name;
        row.bits = bits;
        row.tokens = tokens;
        row.delta_ms = time_ms(groups_of_four, [&](int i) {
          std::vector<CompressedDelta> experts;
          for (int e = 0; e < 4; ++e) experts.push_back(deltas[std::size_t((4 * i + e) % delta_copies)].view);
          multi_delta_matmul(experts, xv, starts.data(), y.data(), shape.rows, options);
        });
        row.loop_ms = time_ms(dense_copies, [&](int i) {
          for (int e = 0; e < 4; ++e)
            dense_bf16_matmul(dense_kernel, threads, dense[std::size_t((i + e) % dense_copies)].data(), shape.rows, shape.cols,
                              x.data() + 2 * e * shape.cols, 2, y.data() + 2 * e * shape.rows, shape.rows);
        });
        row.dense_gemm_ms = time_ms(dense_copies, [&](int i) {
          for (int e = 0; e < 4; ++e) {
            const TensorView w(dense[std::size_t((i + e) % dense_copies)].data(), DType::BF16, {shape.rows, shape.cols});
            const TensorView xe(x.data() + 2 * e * shape.cols, DType::F32, {2, shape.cols});
            dense_matmul(w, xe, y.data() + 2 * e * shape.rows, shape.rows, options);
          }
        });
        row.delta_gbs = 4.0 * double(probe.bytes) / (row.delta_ms * 1e-3) / 1e9;
        row.dense_gbs = 4.0 * double(dense_bytes) / (row.dense_ms() * 1e-3) / 1e9;
        rows.push_back(row);
        std::fprintf(stderr, "%s multi 8 tokens / 4 experts: delta %.3f ms, dense loop %.3f ms, dense_matmul %.3f ms\n",
                     name.c_str(), row.delta_ms, row.loop_ms, row.dense_gemm_ms);
      }
    }
  }

  std::printf("| case | shape (out x in) | bits | tokens | path | delta ms | dense loop ms | dense_matmul ms | "
              "delta / faster dense | delta GB/s | %% of read BW | dense GB/s |\n");
  std::printf("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& row : rows) {
    const std::string kind = row.kind == "multi" ? "8 tokens / 4 experts" : "one expert";
    // 3-bit deltas on an integer path run its float kernel (cpu/simd.hpp).
    std::printf("| %s | %s | %d | %lld | %s | %.3f | %.3f | %.3f | %.3fx | %.1f | %.0f %% | %.1f |\n", kind.c_str(),
                row.shape.c_str(), row.bits, (long long)row.tokens, cpu_path_name(path), row.delta_ms, row.loop_ms,
                row.dense_gemm_ms, row.delta_ms / row.dense_ms(), row.delta_gbs, 100.0 * row.delta_gbs / bandwidth.read_gbs,
                row.dense_gbs);
  }
  if (!json_path.empty()) {
    FILE* file = std::fopen(json_path.c_str(), "w");
    if (file == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fprintf(file,
                 "{\"cpu\": \"%s\", \"path\": \"%s\", \"activation_digits\": %d, \"group\": %lld, \"dense\": \"%s\", "
                 "\"threads\": %d, \"read_gbs\": %.3f, \"copy_gbs\": %.3f, \"timing\": \"%s\", \"rows\": [\n",
                 model.c_str(), cpu_path_name(path), digits, (long long)group, dense_kernel_name(dense_kernel), threads,
                 bandwidth.read_gbs, bandwidth.copy_gbs, arguments.fastest ? "fastest" : "median");
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& row = rows[i];
      std::fprintf(file,
                   "  {\"kind\": \"%s\", \"shape\": \"%s\", \"bits\": %d, \"tokens\": %lld, \"delta_ms\": %.5f, "
                   "\"dense_ms\": %.5f, \"dense_loop_ms\": %.5f, \"dense_matmul_ms\": %.5f, \"delta_gbs\": %.3f, "
                   "\"dense_gbs\": %.3f}%s\n",
                   row.kind.c_str(), row.shape.c_str(), row.bits, (long long)row.tokens, row.delta_ms, row.dense_ms(),
                   row.loop_ms, row.dense_gemm_ms, row.delta_gbs, row.dense_gbs, i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(file, "]}\n");
    std::fclose(file);
  }
  return 0;
#endif
}
