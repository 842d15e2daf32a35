// The fused CPU delta GEMM against a dense dequantize-then-multiply loop written
// here from docs/format.md (its own packer and unpacker), on every CPU path. Each path is its own test case, tagged with its name, so that a
// path this CPU lacks is reported as skipped with the reason rather than passed.
//
// Tolerance: |y - y_dense| <= 1e-5 * M + 1e-30, where M = sum_c |x_c| * |s| * (code + z)
// + sum_j |x_idx_j * S_j| is the magnitude of what is accumulated. The fast paths
// reorder sums (per-lane partial sums, the group trick's s * (sum code x - z X_g)),
// so each term's rounding is bounded by float epsilon times that magnitude, not by
// the (possibly much smaller) result. The integer paths (avx512vnni, avx2int) also round
// each x of the code dot products to within max|x| / 32512 of its block of code bytes with
// two int8 digits (max|x| / 254 with one), so they may be off by a further
// sum_c |s| * (code + z) * max_c |x_t| / 32512 (or / 254).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu_paths.hpp"
#include "meswitch/cpu/delta_gemm.hpp"

using namespace meswitch;
using namespace meswitch::cpu;
using meswitch_test::cpu_runs;

namespace {

struct TestDelta {
  std::int64_t rows = 0, cols = 0, k = 0, group = 0;
  int bits = 0;
  std::vector<std::uint32_t> codes;  // unpacked, [rows, cols]
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint16_t> scales, salient;
  std::vector<std::uint8_t> zeros;
  std::vector<std::int32_t> salient_idx;

  std::int64_t groups() const { return (cols + group - 1) / group; }
  CompressedDelta view() const {
    CompressedDelta d;
    d.qweight = qweight.data();
    d.scales = scales.data();
    d.zeros = zeros.data();
    d.salient_idx = salient_idx.data();
    d.salient = salient.data();
    d.rows = rows;
    d.cols = cols;
    d.k = k;
    d.bits = bits;
    d.group_size = group;
    return d;
  }
};

// Packs like the format says, bit by bit (deliberately the slowest obvious way).
std::vector<std::uint32_t> pack_bits(const std::vector<std::uint32_t>& codes, std::int64_t rows, std::int64_t cols, int bits) {
  const std::int64_t words = (cols * bits + 31) / 32;
  std::vector<std::uint32_t> packed(std::size_t(rows * words), 0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      for (int b = 0; b < bits; ++b)
        if ((codes[std::size_t(r * cols + c)] >> b) & 1u) {
          const std::int64_t bit = c * bits + b;
          packed[std::size_t(r * words + bit / 32)] |= 1u << (bit % 32);
        }
  return packed;
}

TestDelta random_delta(std::int64_t rows, std::int64_t cols, int bits, std::int64_t group, std::int64_t k, unsigned seed) {
  std::mt19937 rng(seed);
  TestDelta d;
  d.rows = rows;
  d.cols = cols;
  d.bits = bits;
  d.group = group;
  d.k = k;
  const std::uint32_t top = (1u << bits) - 1;
  std::uniform_int_distribution<std::uint32_t> code(0, top);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f), value(-0.5f, 0.5f);
  d.codes.resize(std::size_t(rows * cols));
  for (auto& c : d.codes) c = code(rng);
  d.scales.resize(std::size_t(rows * d.groups()));
  d.zeros.resize(std::size_t(rows * d.groups()));
  for (auto& s : d.scales) s = float_to_f16(scale(rng));
  for (auto& z : d.zeros) z = std::uint8_t(code(rng));
  std::vector<std::int32_t> channels(static_cast<std::size_t>(cols));
  std::iota(channels.begin(), channels.end(), 0);
  std::shuffle(channels.begin(), channels.end(), rng);
  d.salient_idx.assign(channels.begin(), channels.begin() + k);
  std::sort(d.salient_idx.begin(), d.salient_idx.end());
  d.salient.resize(std::size_t(rows * k));
  for (auto& s : d.salient) s = float_to_f16(value(rng));
  // Salient channels carry code = zero, as the writer stores them.
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int32_t c : d.salient_idx) d.codes[std::size_t(r * cols + c)] = d.zeros[std::size_t(r * d.groups() + c / group)];
  d.qweight = pack_bits(d.codes, rows, cols, bits);
  return d;
}

std::vector<float> random_values(std::size_t n, unsigned seed, float spread = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

constexpr double kRelative = 1e-5;

// Dense dequantize-then-multiply: y[t, r] += x[t] . full_delta[r]; also the float
// paths' bound and the code term sum_c |s| * (code + z) * max_c |x_t| that the VNNI
// path's rounding of x scales (see the top of the file).
void dense_reference(const TestDelta& d, const std::vector<float>& x, std::int64_t tokens, std::vector<double>& y,
                     std::vector<double>& bound, std::vector<double>& code_term) {
  y.assign(std::size_t(tokens * d.rows), 0.0);
  bound.assign(std::size_t(tokens * d.rows), 0.0);
  code_term.assign(std::size_t(tokens * d.rows), 0.0);
  std::vector<double> largest_x(std::size_t(tokens), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t c = 0; c < d.cols; ++c)
      largest_x[std::size_t(t)] = std::max(largest_x[std::size_t(t)], std::fabs(double(x[std::size_t(t * d.cols + c)])));
  std::vector<float> dense(std::size_t(d.cols));
  std::vector<double> weight_magnitude(std::size_t(d.cols));
  for (std::int64_t r = 0; r < d.rows; ++r) {
    double code_magnitude = 0;  // sum_c |s| * (code + z), salient channels excluded
    for (std::int64_t c = 0; c < d.cols; ++c) {
      const std::size_t g = std::size_t(r * d.groups() + c / d.group);
      const float s = f16_to_float(d.scales[g]);
      const std::uint32_t code = d.codes[std::size_t(r * d.cols + c)];
      dense[std::size_t(c)] = (float(code) - float(d.zeros[g])) * s;
      weight_magnitude[std::size_t(c)] = std::fabs(double(s)) * (double(code) + double(d.zeros[g]));
      code_magnitude += weight_magnitude[std::size_t(c)];
    }
    for (std::int64_t j = 0; j < d.k; ++j) {
      const float s = f16_to_float(d.salient[std::size_t(r * d.k + j)]);
      dense[std::size_t(d.salient_idx[std::size_t(j)])] += s;
      weight_magnitude[std::size_t(d.salient_idx[std::size_t(j)])] += std::fabs(double(s));
    }
    for (std::int64_t t = 0; t < tokens; ++t) {
      double sum = 0, mag = 0;
      for (std::int64_t c = 0; c < d.cols; ++c) {
        const double xc = x[std::size_t(t * d.cols + c)];
        sum += xc * dense[std::size_t(c)];
        mag += std::fabs(xc) * weight_magnitude[std::size_t(c)];
      }
      y[std::size_t(t * d.rows + r)] = sum;
      bound[std::size_t(t * d.rows + r)] = kRelative * mag + 1e-30;
      code_term[std::size_t(t * d.rows + r)] = code_magnitude * largest_x[std::size_t(t)];
    }
  }
}

bool integer_path(CpuPath path) { return path == CpuPath::Avx512Vnni || path == CpuPath::Avx2Int; }

// A CPU path, and on the integer paths the int8 digits per activation.
struct Kernel {
  CpuPath path;
  int digits = 0;
  KernelOptions options(int threads = 0) const {
    KernelOptions o;
    o.path = path;
    o.activation_digits = digits;
    o.num_threads = threads;
    return o;
  }
  // Largest error of x in the code dot products, relative to max|x|: the integer paths
  // round x for 1, 2 and 4 bits (3-bit deltas run the float kernels there).
  double resolution(int bits) const {
    if (!integer_path(path) || bits == 3) return 0;
    return (digits == 1 ? 1.0 / 254 : 1.0 / 32512) * (1 + 1e-3);
  }
  std::string name() const { return std::string(cpu_path_name(path)) + (digits ? " digits " + std::to_string(digits) : ""); }
};

// The kernels of one path: an integer path once per number of int8 digits.
std::vector<Kernel> kernels_of(CpuPath path) {
  if (integer_path(path)) return {{path, 2}, {path, 1}};
  return {{path}};
}

std::vector<double> allowed_error(const Kernel& kernel, int bits, const std::vector<double>& bound,
                                  const std::vector<double>& code_term) {
  std::vector<double> allowed(bound.size());
  for (std::size_t i = 0; i < bound.size(); ++i) allowed[i] = bound[i] + kernel.resolution(bits) * code_term[i];
  return allowed;
}

// Runs one delta on `kernel` and checks it against the dense loop. The reference path
// passes the same check, so a SIMD path also agrees with it to allowed + bound.
void check_kernel(const Kernel& kernel, const TestDelta& d, std::int64_t tokens, unsigned seed) {
  const std::vector<float> x = random_values(std::size_t(tokens * d.cols), seed);
  std::vector<double> expected, bound, code_term;
  dense_reference(d, x, tokens, expected, bound, code_term);
  const std::vector<float> initial = random_values(std::size_t(tokens * d.rows), seed + 1);  // y is accumulated
  const TensorView xv(const_cast<float*>(x.data()), DType::F32, {tokens, d.cols});
  INFO("kernel " << kernel.name() << " bits " << d.bits << " rows " << d.rows << " cols " << d.cols << " group "
               << d.group << " k " << d.k << " tokens " << tokens);
  std::vector<float> y = initial;
  delta_matmul(d.view(), xv, y.data(), d.rows, kernel.options(2));
  const std::vector<double> allowed = allowed_error(kernel, d.bits, bound, code_term);
  for (std::size_t i = 0; i < y.size(); ++i) {
    INFO("element " << i << " got " << y[i] - initial[i] << " expected " << expected[i]);
    REQUIRE(std::fabs(double(y[i]) - double(initial[i]) - expected[i]) <= allowed[i] + 1e-6 * std::fabs(initial[i]));
  }
}

void check_bits_and_group_sizes(const Kernel& kernel) {
  unsigned seed = 1;
  for (int bits = 1; bits <= 4; ++bits) {
    for (std::int64_t group : {32, 64, 128, 0}) {
      for (std::int64_t cols : {32, 96, 544, 1152, 4096}) {
        const std::int64_t g = group == 0 ? cols : group;
        if (cols % g != 0) continue;
        for (std::int64_t rows : {1, 7, 100}) {
          if (rows * cols > 100 * 1152) continue;  // keep the reference path quick
          const std::int64_t k = (seed % 2 == 0) ? 0 : std::max<std::int64_t>(1, cols / 64);
          for (std::int64_t tokens : {1, 3, 64}) {
            if (tokens == 64 && rows * cols > 7 * 4096) continue;
            check_kernel(kernel, random_delta(rows, cols, bits, g, k, seed), tokens, seed * 7);
            ++seed;
          }
        }
      }
    }
  }
}

void check_wide_rows(const Kernel& kernel) {
  // cols 4096 with whole-row groups and 8..17 tokens: every token-block remainder on both SIMD paths.
  for (int bits : {2, 3}) {
    const TestDelta d = random_delta(5, 4096, bits, 4096, 40, 100 + unsigned(bits));
    for (std::int64_t tokens : {2, 5, 8, 9, 17}) check_kernel(kernel, d, tokens, 200 + unsigned(tokens));
  }
}

void check_ragged_groups(const Kernel& kernel) {
  // 100 columns in groups of 32: the last group has 4 columns; all columns take the scalar tail.
  check_kernel(kernel, random_delta(7, 100, 3, 32, 3, 11), 3, 12);
  // 1056 = 2 whole 512-column blocks + 32: blocks and tail in one row, last group ragged (1056 = 8*128 + 32).
  check_kernel(kernel, random_delta(9, 1056, 1, 128, 5, 13), 4, 14);
  // Groups of 8 split a 16-code (2-bit) lane: the whole row must take the scalar path.
  check_kernel(kernel, random_delta(3, 64, 2, 8, 2, 15), 2, 16);
  // Groups of 16 with 4 bits (8 codes per lane) still fit the lanes.
  check_kernel(kernel, random_delta(5, 256, 4, 16, 4, 17), 3, 18);
}

void check_partial_blocks(const Kernel& kernel) {
  // Widths that end inside a SIMD block (256 columns of 2-bit codes on AVX-512, 128 on
  // AVX2, 512 of 1-bit ...): the last block runs vectorised with its words masked. 688 is
  // the tiny family's MLP width; 64k + r with last groups and last words cut short.
  unsigned seed = 300;
  for (int bits = 1; bits <= 4; ++bits) {
    for (const std::int64_t cols : {688, 320, 64 * 5 + 16, 64 * 7 + 24, 64 * 11 + 8, 96}) {
      for (const std::int64_t group : {32, 64, 128, 0}) {
        const std::int64_t g = group == 0 ? cols : std::min(group, cols);
        for (const std::int64_t rows : {1, 5, 33}) {
          const std::int64_t tokens = rows == 5 ? 9 : rows == 1 ? 4 : 1;
          check_kernel(kernel, random_delta(rows, cols, bits, g, seed % 3 == 0 ? 0 : cols / 50 + 1, seed), tokens,
                       seed + 1);
          ++seed;
        }
      }
    }
  }
  // Garbage in the padding bits after the last code of each row (the format leaves them
  // unspecified): every path ignores them.
  for (int bits = 1; bits <= 4; ++bits) {
    TestDelta d = random_delta(17, 64 * 7 + 24, bits, 32, 4, 400 + unsigned(bits));
    const std::int64_t words = (d.cols * bits + 31) / 32, used = d.cols * bits - (words - 1) * 32;
    if (used < 32)
      for (std::int64_t r = 0; r < d.rows; ++r) d.qweight[std::size_t(r * words + words - 1)] |= ~0u << used;
    check_kernel(kernel, d, 5, 410 + unsigned(bits));
  }
}

void check_activation_dtypes(const Kernel& kernel) {
  const TestDelta d = random_delta(33, 512, 2, 64, 6, 21);
  const std::int64_t tokens = 5, stride = 512 + 40;
  std::vector<float> x = random_values(std::size_t(tokens * d.cols), 22);
  // Round x to each 16-bit type first so the dense loop sees the same inputs.
  for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
    std::vector<std::uint16_t> half(std::size_t(tokens * stride), 0);
    std::vector<float> full(std::size_t(tokens * stride), 0.0f), rounded(x.size());
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t c = 0; c < d.cols; ++c) {
        const float v = x[std::size_t(t * d.cols + c)];
        const std::size_t at = std::size_t(t * stride + c);
        if (dtype == DType::BF16) half[at] = float_to_bf16(v), rounded[std::size_t(t * d.cols + c)] = bf16_to_float(half[at]);
        if (dtype == DType::F16) half[at] = float_to_f16(v), rounded[std::size_t(t * d.cols + c)] = f16_to_float(half[at]);
        if (dtype == DType::F32) full[at] = v, rounded[std::size_t(t * d.cols + c)] = v;
      }
    void* data = dtype == DType::F32 ? static_cast<void*>(full.data()) : static_cast<void*>(half.data());
    const TensorView xv(data, dtype, {tokens, d.cols}, {stride, 1});
    std::vector<double> expected, bound, code_term;
    dense_reference(d, rounded, tokens, expected, bound, code_term);
    INFO("kernel " << kernel.name() << " dtype " << dtype_name(dtype));
    const std::int64_t y_stride = d.rows + 3;  // y rows wider than the delta: the pad stays untouched
    std::vector<float> y(std::size_t(tokens * y_stride), 0.0f);
    delta_matmul(d.view(), xv, y.data(), y_stride, kernel.options());
    const std::vector<double> allowed = allowed_error(kernel, d.bits, bound, code_term);
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t r = 0; r < d.rows; ++r) {
        const std::size_t i = std::size_t(t * d.rows + r);
        REQUIRE(std::fabs(double(y[std::size_t(t * y_stride + r)]) - expected[i]) <= allowed[i]);
      }
      for (std::int64_t r = d.rows; r < y_stride; ++r) REQUIRE(y[std::size_t(t * y_stride + r)] == 0.0f);
    }
  }
}

void check_segments(const Kernel& kernel) {
  const std::int64_t cols = 1024, rows = 37;
  std::vector<TestDelta> experts = {random_delta(rows, cols, 2, 64, 10, 31), random_delta(rows, cols, 4, 128, 0, 32),
                                    random_delta(rows, cols, 3, 32, 4, 33), random_delta(rows, cols, 1, 1024, 2, 34),
                                    random_delta(rows, cols, 2, 64, 10, 35)};
  // Segments: 3 tokens, none, 1 token, 4 tokens, none.
  const std::vector<std::int64_t> starts = {0, 3, 3, 4, 8, 8};
  const std::int64_t tokens = 8;
  const std::vector<float> x = random_values(std::size_t(tokens * cols), 36);
  std::vector<double> expected(std::size_t(tokens * rows));
  std::vector<std::vector<double>> bound(experts.size()), code_term(experts.size());  // per expert, its segment's
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const std::int64_t n = starts[e + 1] - starts[e];
    std::vector<float> segment(x.begin() + starts[e] * cols, x.begin() + starts[e + 1] * cols);
    std::vector<double> y;
    dense_reference(experts[e], segment, n, y, bound[e], code_term[e]);
    std::copy(y.begin(), y.end(), expected.begin() + starts[e] * rows);
  }
  std::vector<CompressedDelta> views;
  for (const TestDelta& d : experts) views.push_back(d.view());
  const TensorView xv(const_cast<float*>(x.data()), DType::F32, {tokens, cols});
  for (int threads : {1, 2, 3}) {
    INFO("kernel " << kernel.name() << " threads " << threads);
    std::vector<float> y(std::size_t(tokens * rows), 0.0f);
    KernelOptions options = kernel.options(threads);
    options.row_tile = 8;
    multi_delta_matmul(views, xv, starts.data(), y.data(), rows, options);
    for (std::size_t e = 0; e < experts.size(); ++e) {
      const std::vector<double> allowed = allowed_error(kernel, experts[e].bits, bound[e], code_term[e]);
      for (std::size_t i = 0; i < allowed.size(); ++i) {
        const std::size_t at = std::size_t(starts[e] * rows) + i;
        REQUIRE(std::fabs(double(y[at]) - expected[at]) <= allowed[i]);
      }
    }
  }
  // A batch whose every segment is empty leaves y alone.
  const std::vector<std::int64_t> none = {0, 0, 0, 0, 0, 0};
  std::vector<float> y(std::size_t(rows), 1.5f);
  multi_delta_matmul(views, TensorView(const_cast<float*>(x.data()), DType::F32, {0, cols}), none.data(), y.data(), rows,
                     kernel.options());
  REQUIRE(std::all_of(y.begin(), y.end(), [](float v) { return v == 1.5f; }));
}

void check_thread_counts(const Kernel& kernel) {
  const TestDelta d = random_delta(301, 2048, 2, 64, 20, 41);
  const std::vector<float> x = random_values(std::size_t(3 * d.cols), 42);
  const TensorView xv(const_cast<float*>(x.data()), DType::F32, {3, d.cols});
  std::vector<float> one(std::size_t(3 * d.rows), 0.0f), many(one.size(), 0.0f);
  KernelOptions options = kernel.options(1);
  delta_matmul(d.view(), xv, one.data(), d.rows, options);
  options.num_threads = 4;
  options.row_tile = 5;
  delta_matmul(d.view(), xv, many.data(), d.rows, options);
  REQUIRE(one == many);
}

void check_bad_salient_index(const Kernel& kernel) {
  TestDelta d = random_delta(4, 128, 2, 32, 2, 51);
  d.salient_idx[1] = 500;
  std::vector<float> x(3 * 128), y(3 * 4);
  const TensorView xv(x.data(), DType::F32, {3, 128});
  REQUIRE_THROWS_WITH(delta_matmul(d.view(), xv, y.data(), 4, kernel.options()), Catch::Contains("salient_idx[1] = 500"));
}

void check_non_finite(const Kernel& kernel) {
  const TestDelta d = random_delta(6, 1024, 2, 64, 8, 61);
  std::vector<float> x = random_values(std::size_t(3 * d.cols), 62);
  x[5] = std::numeric_limits<float>::quiet_NaN();               // token 0
  x[std::size_t(d.cols + 700)] = std::numeric_limits<float>::infinity();  // token 1; token 2 stays finite
  const TensorView xv(x.data(), DType::F32, {3, d.cols});
  std::vector<float> y(std::size_t(3 * d.rows), 0.0f);
  delta_matmul(d.view(), xv, y.data(), d.rows, kernel.options());
  for (std::int64_t r = 0; r < d.rows; ++r) {
    REQUIRE_FALSE(std::isfinite(y[std::size_t(r)]));
    REQUIRE_FALSE(std::isfinite(y[std::size_t(d.rows + r)]));
    REQUIRE(std::isfinite(y[std::size_t(2 * d.rows + r)]));
  }
}

// Every check above on every kernel of `path`, each in its own section.
void check_path(CpuPath path) {
  if (!cpu_runs(path)) return;
  REQUIRE(resolve_cpu_path(path) == path);
  for (const Kernel& kernel : kernels_of(path)) {
    DYNAMIC_SECTION(kernel.name() << ": matches the dense loop for bits 1-4 and group sizes") {
      check_bits_and_group_sizes(kernel);
    }
    DYNAMIC_SECTION(kernel.name() << ": wide rows and every token block size") { check_wide_rows(kernel); }
    DYNAMIC_SECTION(kernel.name() << ": ragged last groups and groups that split SIMD lanes") {
      check_ragged_groups(kernel);
    }
    DYNAMIC_SECTION(kernel.name() << ": widths ending inside a SIMD block, and padding bits") {
      check_partial_blocks(kernel);
    }
    DYNAMIC_SECTION(kernel.name() << ": BF16 and F16 activations and strided rows") { check_activation_dtypes(kernel); }
    DYNAMIC_SECTION(kernel.name() << ": multi_delta_matmul segments, empty ones skipped") { check_segments(kernel); }
    DYNAMIC_SECTION(kernel.name() << ": the same bits with any thread count") { check_thread_counts(kernel); }
    DYNAMIC_SECTION(kernel.name() << ": a salient index out of range is an error") { check_bad_salient_index(kernel); }
    DYNAMIC_SECTION(kernel.name() << ": NaN and Inf activations give non-finite outputs") { check_non_finite(kernel); }
  }
}

}  // namespace

TEST_CASE("delta_matmul on the reference path", "[delta_gemm][reference]") { check_path(CpuPath::Reference); }

TEST_CASE("delta_matmul on the avx2 path", "[delta_gemm][avx2]") { check_path(CpuPath::Avx2); }

TEST_CASE("delta_matmul on the avx512 path", "[delta_gemm][avx512]") { check_path(CpuPath::Avx512); }

TEST_CASE("delta_matmul on the avx512vnni path", "[delta_gemm][avx512vnni]") { check_path(CpuPath::Avx512Vnni); }

TEST_CASE("delta_matmul on the avx2int path", "[delta_gemm][avx2int]") { check_path(CpuPath::Avx2Int); }

namespace {

// The float kernels stay within the float bound of the dense loop; one int8 digit per x
// rounds x to max|x| / 254 of its block, far beyond that bound on most outputs, and two
// digits land between (largest errors measured on avx512vnni: float 1e-6, two digits 3e-4,
// one digit 4e-2; 304 of 320 one-digit outputs beyond the float bound; the same on
// avx2int). So these errors show that the int8 kernel ran, with the digits asked.
void check_digits_asked(CpuPath integer, CpuPath floating) {
  const TestDelta d = random_delta(64, 1024, 2, 64, 10, 71);
  const std::int64_t tokens = 5;
  const std::vector<float> x = random_values(std::size_t(tokens * d.cols), 72);
  std::vector<double> expected, bound, code_term;
  dense_reference(d, x, tokens, expected, bound, code_term);
  const TensorView xv(const_cast<float*>(x.data()), DType::F32, {tokens, d.cols});
  const auto error_of = [&](const Kernel& kernel) {
    std::vector<float> y(std::size_t(tokens * d.rows), 0.0f);
    delta_matmul(d.view(), xv, y.data(), d.rows, kernel.options());
    std::vector<double> error(y.size());
    for (std::size_t i = 0; i < y.size(); ++i) error[i] = std::fabs(double(y[i]) - expected[i]);
    return error;
  };
  const std::vector<double> float_error = error_of({floating}), one_digit = error_of({integer, 1}),
                            two_digits = error_of({integer, 2});
  std::size_t one_digit_beyond_float_bound = 0;
  double largest_float = 0, largest_one = 0, largest_two = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    REQUIRE(float_error[i] <= bound[i]);
    one_digit_beyond_float_bound += one_digit[i] > bound[i];
    largest_float = std::max(largest_float, float_error[i]);
    largest_one = std::max(largest_one, one_digit[i]);
    largest_two = std::max(largest_two, two_digits[i]);
  }
  INFO("largest error: float " << largest_float << ", two digits " << largest_two << ", one digit " << largest_one);
  REQUIRE(one_digit_beyond_float_bound * 4 > expected.size() * 3);
  REQUIRE(largest_two > 30 * largest_float);
  REQUIRE(largest_one > 30 * largest_two);
}

}  // namespace

TEST_CASE("the avx512vnni path multiplies int8 digits of x, one or two as asked", "[delta_gemm][avx512vnni]") {
  if (cpu_runs(CpuPath::Avx512Vnni)) check_digits_asked(CpuPath::Avx512Vnni, CpuPath::Avx512);
}

TEST_CASE("the avx2int path multiplies int8 digits of x, one or two as asked", "[delta_gemm][avx2int]") {
  if (cpu_runs(CpuPath::Avx2Int)) check_digits_asked(CpuPath::Avx2Int, CpuPath::Avx2);
}

#if MESWITCH_X86_KERNELS
TEST_CASE("int8 digits of x follow the rule and layout both integer paths read", "[delta_gemm][avx2int][avx512vnni]") {
  // The quantizer is AVX2 code shared by both paths; here it is checked for both block
  // widths (64 code bytes for avx512vnni, 32 for avx2int) against the rule written out
  // per value (cpu/delta_gemm_digits.hpp): scale max|x| / 127 (/ 128 with two digits),
  // hi = round(x / scale'), lo = round((x / scale' - hi) * 128), byte j of position p
  // holding column (8 / bits) * j + p; and against the stated bound.
  if (!cpu_runs(CpuPath::Avx2)) return;
  unsigned seed = 80;
  for (const int lanes : {8, 16})
    for (const int bits : {1, 2, 4})
      for (const int digit_count : {1, 2})
        for (const std::int64_t cols : {64, 688, 1056}) {
          const TestDelta d = random_delta(1, cols, bits, cols, 0, seed);
          const std::int64_t tokens = 3;
          std::vector<float> x = random_values(std::size_t(tokens * cols), seed + 1, 3.0f);
          for (std::int64_t c = 0; c < std::min<std::int64_t>(cols, 64); ++c) x[std::size_t(cols + c)] = 0.0f;  // a zero block
          x[std::size_t(2 * cols + cols - 1)] = std::numeric_limits<float>::infinity();  // a poisoned last block
          ++seed;
          cpu::detail::PreparedTokens prep;
          cpu::detail::prepare_tokens(d.view(), TensorView(x.data(), DType::F32, {tokens, cols}), 0, tokens, lanes, prep, false);
          cpu::detail::quantize_digits(bits, digit_count, prep);
          const int per_byte = 8 / bits;
          const std::int64_t block_bytes = 4 * lanes, block_cols = block_bytes * per_byte;
          REQUIRE(prep.block_cols == block_cols);
          INFO("lanes " << lanes << " bits " << bits << " digits " << digit_count << " cols " << cols);
          for (std::int64_t b = 0; b < prep.blocks; ++b)
            for (std::int64_t t = 0; t < tokens; ++t) {
              float largest = 0;
              bool finite = true;
              for (std::int64_t c = b * block_cols; c < std::min(cols, (b + 1) * block_cols); ++c) {
                largest = std::max(largest, std::fabs(x[std::size_t(t * cols + c)]));
                finite = finite && std::isfinite(x[std::size_t(t * cols + c)]);
              }
              const float scale = prep.digit_scales[std::size_t(b * tokens + t)];
              const std::int8_t* digits = prep.digits.data() + (b * tokens + t) * digit_count * block_cols;
              if (!finite) {
                REQUIRE(std::isnan(scale));
                continue;
              }
              REQUIRE(scale == largest / 127.0f / float(digit_count == 2 ? 128 : 1));
              for (std::int64_t j = 0; j < block_bytes; ++j)
                for (int p = 0; p < per_byte; ++p) {
                  const std::int64_t c = b * block_cols + per_byte * j + p;
                  const float value = c < cols ? x[std::size_t(t * cols + c)] : 0.0f;
                  const int hi = digits[p * block_bytes + j];
                  const int lo = digit_count == 2 ? digits[(per_byte + p) * block_bytes + j] : 0;
                  if (largest == 0) {
                    REQUIRE(hi == 0);
                    REQUIRE(lo == 0);
                    continue;
                  }
                  const float v = std::min(127.0f, std::max(-127.0f, value * (127.0f / largest)));
                  REQUIRE(hi == int(std::nearbyint(v)));
                  if (digit_count == 2) REQUIRE(lo == int(std::nearbyint((v - std::nearbyint(v)) * 128.0f)));
                  const double represented = double(scale) * (digit_count == 2 ? 128.0 * hi + lo : double(hi));
                  REQUIRE(std::fabs(represented - value) <= largest / (digit_count == 2 ? 32512.0 : 254.0) * (1 + 1e-3));
                }
            }
        }
}
#endif

TEST_CASE("a delta over tensor views and the kernels reject bad input with context", "[delta_gemm]") {
  TestDelta d = random_delta(4, 128, 2, 32, 2, 51);
  TensorView q(d.qweight.data(), DType::U32, {4, 8}), s(d.scales.data(), DType::F16, {4, 4}), z(d.zeros.data(), DType::U8, {4, 4}),
      idx(d.salient_idx.data(), DType::I32, {2}), sal(d.salient.data(), DType::F16, {4, 2});
  const auto over = [&](const TensorView& qweight, const TensorView& scales, const TensorView& zeros, int bits,
                        std::int64_t group_size, const std::string& name = "") {
    return CompressedDelta::over_views(name, -1, 128, bits, group_size, -1, qweight, scales, zeros, idx, sal);
  };
  const CompressedDelta ok = over(q, s, z, 2, 32, "layer.w");
  REQUIRE(ok.rows == 4);
  REQUIRE(ok.groups() == 4);
  REQUIRE(ok.k == 2);
  REQUIRE(over(q, TensorView(d.scales.data(), DType::F16, {4, 1}), TensorView(d.zeros.data(), DType::U8, {4, 1}), 2, 0)
              .group_size == 128);
  REQUIRE_THROWS_WITH(over(TensorView(d.qweight.data(), DType::U32, {4, 7}), s, z, 2, 32, "layer.w"),
                      Catch::Contains("layer.w.qweight") && Catch::Contains("[4, 7]") &&
                          Catch::Contains("8 words per row expected"));
  REQUIRE_THROWS_WITH(over(q, TensorView(d.scales.data(), DType::U8, {4, 4}), z, 2, 32, "layer.w"),
                      Catch::Contains("layer.w.scales") && Catch::Contains("F16"));
  REQUIRE_THROWS_WITH(over(q, s, z, 5, 32), Catch::Contains("bits"));
  REQUIRE_THROWS_WITH(over(q, s, z, 2, 256), Catch::Contains("group size"));

  std::vector<float> x(3 * 64), y(3 * 4);
  REQUIRE_THROWS_WITH(delta_matmul(ok, TensorView(x.data(), DType::F32, {3, 64}), y.data(), 4), Catch::Contains("128 input columns"));
  std::vector<std::int32_t> x_int(3 * 128);
  REQUIRE_THROWS_WITH(delta_matmul(ok, TensorView(x_int.data(), DType::I32, {3, 128}), y.data(), 4), Catch::Contains("x must be"));
  std::vector<float> x_ok(3 * 128);
  const TensorView xv(x_ok.data(), DType::F32, {3, 128});
  REQUIRE_THROWS_WITH(delta_matmul(ok, xv, y.data(), 2), Catch::Contains("stride"));
  const std::vector<std::int64_t> bad_starts = {0, 2, 1};
  REQUIRE_THROWS_WITH(multi_delta_matmul({ok, ok}, xv, bad_starts.data(), y.data(), 4), Catch::Contains("segment_starts[2]"));
  REQUIRE_THROWS_WITH(parse_cpu_path("sse"), Catch::Contains("sse"));
  KernelOptions three_digits;
  three_digits.activation_digits = 3;
  REQUIRE_THROWS_WITH(delta_matmul(ok, xv, y.data(), 4, three_digits), Catch::Contains("activation_digits"));
}
