// The dense GEMM (cpu/dense_gemm.hpp) against a float64 product written here, on every CPU
// path, for F32, F16 and BF16 weights on shapes that are not multiples of the vector width,
// the row group or the token block, with strided x and W, 1 and 2 threads.
//
// Bound: |y - y64| <= (cols / 8 + 17) * 2^-24 * M + 1e-30, M = sum_c |W[r, c] x[t, c]|:
// each of L <= 16 lanes sums ceil(cols / L) float32 products in order, then the lanes are
// added (cols / L + L roundings of at most 2^-24 of M each); weights widen exactly. y64
// multiplies the same widened weights in double.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu_paths.hpp"
#include "meswitch/cpu/dense_gemm.hpp"
#include "meswitch/half.hpp"

using namespace meswitch;
using namespace meswitch::cpu;
using meswitch_test::cpu_runs;

namespace {

// W [rows, cols] stored with `row_stride` elements per row, as `dtype` and widened back.
struct TestWeight {
  DType dtype;
  std::int64_t rows, cols, row_stride;
  std::vector<std::uint16_t> half;  // F16/BF16 storage
  std::vector<float> single;        // F32 storage
  std::vector<float> widened;       // [rows, cols], the values the kernel multiplies

  TensorView view() const {
    void* data = dtype == DType::F32 ? (void*)single.data() : (void*)half.data();
    return TensorView(data, dtype, {rows, cols}, {row_stride, 1});
  }
};

TestWeight random_weight(DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t row_stride, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  TestWeight w{dtype, rows, cols, row_stride, {}, {}, {}};
  const std::size_t stored = std::size_t(std::max<std::int64_t>(rows * row_stride, 1));
  w.half.assign(stored, 0x7e00);  // padding between rows: NaN in F16 (and BF16 patterns), never read
  w.single.assign(stored, std::numeric_limits<float>::quiet_NaN());
  w.widened.resize(std::size_t(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const float value = normal(rng);
      const std::size_t at = std::size_t(r * row_stride + c);
      float& widened = w.widened[std::size_t(r * cols + c)];
      if (dtype == DType::F32) {
        w.single[at] = widened = value;
      } else if (dtype == DType::F16) {
        w.half[at] = float_to_f16(value);
        widened = f16_to_float(w.half[at]);
      } else {
        w.half[at] = float_to_bf16(value);
        widened = bf16_to_float(w.half[at]);
      }
    }
  return w;
}

// Runs one case and returns how many outputs break the bound (the first one in `failure`).
// x rows are x_stride apart (>= cols); y rows y_stride apart (> rows: the gap must stay).
int check_case(CpuPath path, const TestWeight& w, std::int64_t tokens, int threads, unsigned seed, std::string& failure) {
  const std::int64_t x_stride = w.cols + 3, y_stride = w.rows + 2;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(std::size_t(std::max<std::int64_t>(tokens * x_stride, 1)), std::numeric_limits<float>::quiet_NaN());
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t c = 0; c < w.cols; ++c) x[std::size_t(t * x_stride + c)] = normal(rng);
  const float sentinel = -7.25f;
  std::vector<float> y(std::size_t(std::max<std::int64_t>(tokens * y_stride, 1)), sentinel);
  for (std::int64_t t = 0; t < tokens; ++t)  // written, not accumulated: stale NaN must vanish
    for (std::int64_t r = 0; r < w.rows; ++r) y[std::size_t(t * y_stride + r)] = std::numeric_limits<float>::quiet_NaN();
  KernelOptions options;
  options.path = path;
  options.num_threads = threads;
  dense_matmul(w.view(), TensorView(x.data(), DType::F32, {tokens, w.cols}, {x_stride, 1}), y.data(), y_stride, options);
  int failures = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t r = 0; r < w.rows; ++r) {
      double exact = 0, magnitude = 0;
      for (std::int64_t c = 0; c < w.cols; ++c) {
        const double product = double(w.widened[std::size_t(r * w.cols + c)]) * double(x[std::size_t(t * x_stride + c)]);
        exact += product;
        magnitude += std::fabs(product);
      }
      const double bound = (double(w.cols) / 8 + 17) * std::ldexp(1.0, -24) * magnitude + 1e-30;
      const double got = y[std::size_t(t * y_stride + r)];
      if (!(std::fabs(got - exact) <= bound) && failures++ == 0)
        failure = "token " + std::to_string(t) + " row " + std::to_string(r) + ": got " + std::to_string(got) +
                  ", float64 " + std::to_string(exact) + ", bound " + std::to_string(bound);
    }
    for (std::int64_t r = w.rows; r < y_stride && t + 1 < tokens; ++r)
      if (y[std::size_t(t * y_stride + r)] != sentinel && failures++ == 0)
        failure = "wrote into the row stride gap at token " + std::to_string(t) + " column " + std::to_string(r);
  }
  return failures;
}

void check_path(CpuPath path) {
  if (!cpu_runs(path)) return;
  unsigned seed = 1;
  for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
    for (std::int64_t cols : {1, 7, 16, 33, 64, 250, 1031, 5000}) {
      for (std::int64_t rows : {1, 3, 4, 6, 37}) {
        const std::int64_t row_stride = rows % 2 == 0 ? cols : cols + 5;
        const TestWeight w = random_weight(dtype, rows, cols, row_stride, seed++);
        for (std::int64_t tokens : {1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 17, 40}) {
          if (cols * rows * tokens > 2'000'000) continue;  // the float64 check stays quick
          for (int threads : {1, 2}) {
            std::string failure;
            const int failures = check_case(path, w, tokens, threads, seed++, failure);
            INFO(cpu_path_name(path) << " " << dtype_name(dtype) << " W [" << rows << ", " << cols << "] row stride "
                                     << row_stride << ", " << tokens << " tokens, " << threads << " threads: "
                                     << failures << " outputs wrong, first " << failure);
            REQUIRE(failures == 0);
          }
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("dense_matmul on the reference path", "[dense_gemm][reference]") { check_path(CpuPath::Reference); }

TEST_CASE("dense_matmul on the avx2 path", "[dense_gemm][avx2]") { check_path(CpuPath::Avx2); }

TEST_CASE("dense_matmul on the avx512 path", "[dense_gemm][avx512]") { check_path(CpuPath::Avx512); }

TEST_CASE("dense_matmul on the avx512vnni path (the avx512 float kernel)", "[dense_gemm][avx512vnni]") {
  check_path(CpuPath::Avx512Vnni);
}

TEST_CASE("dense_matmul on the avx2int path (the avx2 float kernel)", "[dense_gemm][avx2int]") {
  check_path(CpuPath::Avx2Int);
}

TEST_CASE("dense_matmul: a wrong bf16 widening order shows as error beyond the bound", "[dense_gemm]") {
  // Guards the bound itself: the same weights read as F16 instead of BF16 (the bits are
  // valid for both) give results far outside it, so the check above can fail.
  const TestWeight w = random_weight(DType::BF16, 8, 100, 100, 9);
  TestWeight misread = w;
  misread.dtype = DType::F16;
  std::string failure;
  REQUIRE(check_case(CpuPath::Reference, misread, 3, 1, 10, failure) > 0);
}

TEST_CASE("dense_matmul rejects bad input with context", "[dense_gemm]") {
  std::vector<std::uint16_t> w(4 * 8);
  std::vector<float> x(3 * 8), y(3 * 4);
  const TensorView weight(w.data(), DType::BF16, {4, 8}), xv(x.data(), DType::F32, {3, 8});
  REQUIRE_NOTHROW(dense_matmul(weight, xv, y.data(), 4));
  REQUIRE_THROWS_WITH(dense_matmul(TensorView(w.data(), DType::U8, {4, 8}), xv, y.data(), 4),
                      Catch::Contains("weight must be F16, BF16 or F32") && Catch::Contains("U8"));
  REQUIRE_THROWS_WITH(dense_matmul(TensorView(w.data(), DType::BF16, {32}), xv, y.data(), 4),
                      Catch::Contains("weight must be 2-D") && Catch::Contains("[32]"));
  REQUIRE_THROWS_WITH(dense_matmul(TensorView(w.data(), DType::BF16, {4, 4}, {1, 4}), TensorView(x.data(), DType::F32, {3, 4}),
                                   y.data(), 4),
                      Catch::Contains("column stride 1"));
  REQUIRE_THROWS_WITH(dense_matmul(weight, TensorView(x.data(), DType::F32, {4, 6}), y.data(), 4),
                      Catch::Contains("x has shape [4, 6]") && Catch::Contains("[4, 8]"));
  std::vector<std::int32_t> x_int(3 * 8);
  REQUIRE_THROWS_WITH(dense_matmul(weight, TensorView(x_int.data(), DType::I32, {3, 8}), y.data(), 4),
                      Catch::Contains("x must be F32, BF16 or F16"));
  REQUIRE_THROWS_WITH(dense_matmul(weight, xv, y.data(), 3), Catch::Contains("y row stride 3"));
  REQUIRE_THROWS_WITH(dense_matmul(weight, xv, nullptr, 4), Catch::Contains("y is null"));
  KernelOptions bad_tile;
  bad_tile.row_tile = -1;
  REQUIRE_THROWS_WITH(dense_matmul(weight, xv, y.data(), 4, bad_tile), Catch::Contains("row_tile"));
}
