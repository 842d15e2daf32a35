// The CUDA kernels on a GPU against the CPU reference: the tiles dequantized on the device
// equal meswitch::dequantize_delta bit for bit, and multi_delta_matmul over a mixed batch
// matches delta_matmul (reference path) per token and expert. Without a CUDA device these
// test cases print "SKIPPED: no CUDA device: <reason>" and ctest reports them as skipped;
// the argument checks (which run before anything touches a device) run everywhere.
//
// Tolerance: |y - y_ref| <= 1e-4 * M + 1e-6, M = sum_c |x_c w_c| + sum_j |x_idx_j S_j| the
// magnitude of what is accumulated, on the same 16-bit activations. The products are exact
// (integer codes times 16-bit x), so what remains is the order of the float32 sums and the
// tensor cores' own accumulation, which is not IEEE round-to-nearest inside an mma; 1e-4 is
// ten times the bound the host emulation of the same loop meets (1e-5). An f16 or bf16
// output adds its own rounding, half a unit in the last place of |y|: 2^-11 or 2^-8 of it.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "meswitch/cpu/delta_gemm.hpp"
#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/delta_gemm.hpp"
#include "meswitch/cuda/dequantize.hpp"
#include "meswitch/cuda/device_memory.hpp"
#include "meswitch/cuda/segments.hpp"
#include "meswitch/quantize.hpp"
#include "random_delta.hpp"

using namespace meswitch;
using meswitch_test::CanonicalDelta;
using meswitch_test::random_delta;

namespace {

// Catch2 v2 has no skip: without a device the case prints the reason and returns, and
// ctest reports it as skipped (SKIP_REGULAR_EXPRESSION in tests/cpp/CMakeLists.txt).
bool gpu_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    if (status != cudaSuccess)
      WARN("SKIPPED: no CUDA device: cudaGetDeviceCount failed with " << cudaGetErrorName(status) << " ("
                                                                       << cudaGetErrorString(status) << ")");
    else
      WARN("SKIPPED: no CUDA device: cudaGetDeviceCount found none");
    return false;
  }
  return true;
}

template <typename T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> buffer(host.size(), "test data");
  MESWITCH_CUDA_CHECK(cudaMemcpy(buffer.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "test upload");
  return buffer;
}

template <typename T>
std::vector<T> to_host(const cuda::DeviceBuffer<T>& buffer) {
  std::vector<T> host(buffer.size());
  MESWITCH_CUDA_CHECK(cudaMemcpy(host.data(), buffer.data(), buffer.bytes(), cudaMemcpyDeviceToHost), "test download");
  return host;
}

float to_float(std::uint16_t bits, DType dtype) { return dtype == DType::BF16 ? bf16_to_float(bits) : f16_to_float(bits); }
std::uint16_t from_float(float value, DType dtype) { return dtype == DType::BF16 ? float_to_bf16(value) : float_to_f16(value); }

struct Batch {
  std::int64_t tokens = 0, cols = 0;
  DType dtype = DType::F16;
  std::vector<std::uint16_t> x;   // [tokens, cols] 16-bit
  std::vector<std::int32_t> ids;  // expert per token
};

Batch random_batch(std::int64_t tokens, std::int64_t cols, DType dtype, int experts, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Batch batch{tokens, cols, dtype, std::vector<std::uint16_t>(std::size_t(tokens * cols)), std::vector<std::int32_t>(std::size_t(tokens))};
  for (auto& value : batch.x) value = from_float(normal(rng), dtype);
  std::uniform_int_distribution<int> expert(0, experts - 1);
  for (auto& id : batch.ids) id = expert(rng);
  return batch;
}

// y_ref[t] = x[t] @ delta_{id_t}^T (reference path, double sums) and its magnitude M.
void reference(const std::vector<CanonicalDelta>& experts, const Batch& batch, std::vector<double>& y,
               std::vector<double>& magnitude) {
  const std::int64_t rows = experts[0].rows, cols = batch.cols;
  y.assign(std::size_t(batch.tokens * rows), 0.0);
  magnitude.assign(y.size(), 0.0);
  cpu::KernelOptions options;
  options.path = cpu::CpuPath::Reference;
  std::vector<std::vector<float>> dense(experts.size());
  for (std::size_t e = 0; e < experts.size(); ++e) {
    dense[e].resize(std::size_t(rows * cols));
    dequantize_delta(experts[e].view(), dense[e].data());
  }
  for (std::int64_t t = 0; t < batch.tokens; ++t) {
    const std::int32_t id = batch.ids[std::size_t(t)];
    if (id < 0 || id >= std::int32_t(experts.size())) continue;
    const CanonicalDelta& d = experts[std::size_t(id)];
    std::vector<float> row(std::size_t(rows), 0.0f);
    const TensorView x(const_cast<std::uint16_t*>(batch.x.data() + t * cols), batch.dtype, Shape{1, cols});
    cpu::delta_matmul(d.view(), x, row.data(), rows, options);
    for (std::int64_t r = 0; r < rows; ++r) {
      y[std::size_t(t * rows + r)] = row[std::size_t(r)];
      double sum = 0;
      for (std::int64_t c = 0; c < cols; ++c)
        sum += std::fabs(double(to_float(batch.x[std::size_t(t * cols + c)], batch.dtype)) * dense[std::size_t(id)][std::size_t(r * cols + c)]);
      magnitude[std::size_t(t * rows + r)] = sum;
    }
  }
}

// Runs multi_delta_matmul on the device over `batch` into an output of `out_dtype`
// (initialised to `initial`, as 32- or 16-bit floats) and returns it as float.
std::vector<float> run_gpu(const std::vector<CanonicalDelta>& experts, const Batch& batch, DType out_dtype,
                           const std::vector<float>& initial, cudaStream_t stream) {
  const std::int64_t rows = experts[0].rows;
  std::vector<cuda::DeviceDelta> uploaded;
  std::vector<cuda::DeviceDeltaView> views;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    uploaded.push_back(cuda::DeviceDelta::upload(experts[e].view("experts." + std::to_string(e)), stream));
    views.push_back(uploaded.back().view());
  }
  const int expert_count = int(experts.size());
  cuda::DeviceBuffer<std::uint16_t> x = to_device(batch.x);
  cuda::DeviceBuffer<std::int32_t> ids = to_device(batch.ids);
  cuda::DeviceBuffer<std::int32_t> order(std::size_t(std::max<std::int64_t>(batch.tokens, 1)));
  cuda::DeviceBuffer<cuda::WorkItem> items(std::size_t(cuda::work_item_capacity(batch.tokens, expert_count)));
  cuda::build_segments(ids.data(), batch.tokens, expert_count, order.data(), items.data(), stream);
  cuda::SegmentTableView table{batch.tokens, expert_count, order.data(), items.data()};

  const cuda::DeviceMatrix x_matrix{x.data(), batch.dtype, batch.tokens, batch.cols, batch.cols};
  std::vector<float> result(initial.size());
  if (out_dtype == DType::F32) {
    cuda::DeviceBuffer<float> y = to_device(initial);
    cuda::multi_delta_matmul(views, x_matrix, table, {y.data(), DType::F32, batch.tokens, rows, rows}, stream);
    MESWITCH_CUDA_CHECK(cudaStreamSynchronize(stream), "test");
    result = to_host(y);
  } else {
    std::vector<std::uint16_t> half(initial.size());
    for (std::size_t i = 0; i < half.size(); ++i) half[i] = from_float(initial[i], out_dtype);
    cuda::DeviceBuffer<std::uint16_t> y = to_device(half);
    cuda::multi_delta_matmul(views, x_matrix, table, {y.data(), out_dtype, batch.tokens, rows, rows}, stream);
    MESWITCH_CUDA_CHECK(cudaStreamSynchronize(stream), "test");
    half = to_host(y);
    for (std::size_t i = 0; i < half.size(); ++i) result[i] = to_float(half[i], out_dtype);
  }
  return result;
}

void check_against_reference(const std::vector<CanonicalDelta>& experts, const Batch& batch, DType out_dtype,
                             cudaStream_t stream = nullptr) {
  const std::int64_t rows = experts[0].rows;
  std::vector<float> initial(std::size_t(batch.tokens * rows));
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& value : initial) value = out_dtype == DType::F32 ? normal(rng) : to_float(from_float(normal(rng), out_dtype), out_dtype);
  const std::vector<float> got = run_gpu(experts, batch, out_dtype, initial, stream);
  std::vector<double> expected, magnitude;
  reference(experts, batch, expected, magnitude);
  const double output_rounding = out_dtype == DType::F16 ? std::ldexp(1.0, -11) : out_dtype == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
  for (std::int64_t t = 0; t < batch.tokens; ++t) {
    const std::int32_t id = batch.ids[std::size_t(t)];
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::size_t at = std::size_t(t * rows + r);
      INFO("token " << t << " (expert " << id << ") row " << r << " out " << dtype_name(out_dtype));
      if (id >= std::int32_t(experts.size())) {
        REQUIRE(std::isnan(got[at]));  // an out-of-range id poisons its row
      } else if (id < 0) {
        REQUIRE(got[at] == initial[at]);  // no expert: untouched
      } else {
        const double want = double(initial[at]) + expected[at];
        REQUIRE(std::fabs(double(got[at]) - want) <= 1e-4 * magnitude[at] + 1e-6 + output_rounding * std::fabs(want));
      }
    }
  }
}

}  // namespace

TEST_CASE("tiles dequantized on the GPU equal the CPU reference bit for bit", "[cuda][gpu]") {
  if (!gpu_available()) return;
  for (const DType activation : {DType::F16, DType::BF16})
    for (int bits = 1; bits <= 4; ++bits)
      for (const auto& [rows, cols, group, k] : std::vector<std::array<std::int64_t, 4>>{
               {64, 64, 64, 3}, {128, 192, 80, 7}, {64, 1024, 16, 0}, {192, 320, 48, 320}}) {
        const CanonicalDelta d = random_delta(rows, cols, bits, group, k, unsigned(bits * 10 + cols));
        cuda::DeviceDelta uploaded = cuda::DeviceDelta::upload(d.view(), nullptr);
        cuda::DeviceBuffer<float> dense(std::size_t(rows * cols));
        cuda::dequantize_delta(uploaded.view(), activation, dense.data(), cols, nullptr);
        MESWITCH_CUDA_CHECK(cudaDeviceSynchronize(), "test");
        std::vector<float> expected(std::size_t(rows * cols));
        dequantize_delta(d.view(), expected.data());
        const std::vector<float> got = to_host(dense);
        INFO(dtype_name(activation) << " bits " << bits << " [" << rows << ", " << cols << "] group " << group);
        REQUIRE(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)) == 0);
      }
}

TEST_CASE("multi_delta_matmul on the GPU matches delta_matmul for bits 1-4, f16 and bf16", "[cuda][gpu]") {
  if (!gpu_available()) return;
  for (const DType dtype : {DType::F16, DType::BF16})
    for (int bits = 1; bits <= 4; ++bits)
      for (const std::int64_t tokens : {1, 5, 16, 33}) {  // 8-, 16- and 32-token work items
        const std::vector<CanonicalDelta> experts = {random_delta(128, 1024, bits, 64, 10, unsigned(bits)),
                                                     random_delta(128, 1024, bits, 128, 0, unsigned(bits + 50))};
        const Batch batch = random_batch(tokens, 1024, dtype, 2, unsigned(tokens + bits));
        INFO(dtype_name(dtype) << " bits " << bits << " tokens " << tokens);
        check_against_reference(experts, batch, DType::F32);
      }
}

TEST_CASE("a mixed batch: unsorted ids, different widths and groups, -1 and out-of-range ids, 16-bit outputs",
          "[cuda][gpu]") {
  if (!gpu_available()) return;
  const std::vector<CanonicalDelta> experts = {
      random_delta(256, 2048, 2, 64, 20, 1), random_delta(256, 2048, 4, 128, 5, 2), random_delta(256, 2048, 3, 32, 0, 3),
      random_delta(256, 2048, 1, 2048, 2048, 4), random_delta(256, 2048, 2, 48, 7, 5)};
  for (const DType out : {DType::F32, DType::F16, DType::BF16})
    for (const std::int64_t tokens : {3, 40, 300}) {
      Batch batch = random_batch(tokens, 2048, DType::BF16, 5, unsigned(tokens));
      batch.ids[0] = -1;                   // base only
      batch.ids[std::size_t(tokens - 1)] = 9;  // no such expert
      INFO("tokens " << tokens);
      check_against_reference(experts, batch, out);
    }
}

TEST_CASE("multi_delta_matmul runs on the caller's stream", "[cuda][gpu]") {
  if (!gpu_available()) return;
  cudaStream_t stream = nullptr;
  MESWITCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "test");
  const std::vector<CanonicalDelta> experts = {random_delta(64, 4096, 2, 64, 40, 7)};
  check_against_reference(experts, random_batch(7, 4096, DType::F16, 1, 8), DType::F32, stream);
  MESWITCH_CUDA_CHECK(cudaStreamDestroy(stream), "test");
}

TEST_CASE("the CUDA delta GEMM refuses bad arguments before launching, naming them", "[cuda]") {
  // No device needed: every check runs on the host before any CUDA call.
  std::uint32_t words[4] = {};
  std::int32_t indices[4] = {};
  alignas(16) std::uint16_t x_storage[64] = {};
  cuda::WorkItem items[8] = {};
  cuda::DeviceDeltaView delta{"layer.w", 64, 64, 64, 0, 2, words, words, indices, nullptr};
  const cuda::SegmentTableView table{1, 1, indices, items};
  const cuda::DeviceMatrix x{x_storage, DType::F16, 1, 64, 64};
  float y_storage[64];
  const cuda::DeviceMatrix y{y_storage, DType::F32, 1, 64, 64};
  const auto call = [&](cuda::DeviceDeltaView d, cuda::DeviceMatrix xm, cuda::DeviceMatrix ym) {
    cuda::multi_delta_matmul({d}, xm, table, ym, nullptr);
  };
  cuda::DeviceDeltaView odd = delta;
  odd.rows = 100;
  REQUIRE_THROWS_WITH(call(odd, x, y), Catch::Contains("layer.w") && Catch::Contains("multiples of 64"));
  odd = delta;
  odd.group_size = 24;
  REQUIRE_THROWS_WITH(call(odd, x, y), Catch::Contains("multiple of 16 or the whole row"));
  cuda::DeviceMatrix bad_x = x;
  bad_x.dtype = DType::F32;
  REQUIRE_THROWS_WITH(call(delta, bad_x, y), Catch::Contains("F16 or BF16"));
  bad_x = x;
  bad_x.cols = 128;
  REQUIRE_THROWS_WITH(call(delta, bad_x, y), Catch::Contains("x has 128 columns"));
  bad_x = x;
  bad_x.data = x_storage + 1;
  REQUIRE_THROWS_WITH(call(delta, bad_x, y), Catch::Contains("16-byte aligned"));
  cuda::DeviceMatrix bad_y = y;
  bad_y.dtype = DType::I32;
  REQUIRE_THROWS_WITH(call(delta, x, bad_y), Catch::Contains("out: expected F32, F16 or BF16"));
  bad_y = y;
  bad_y.cols = 32;
  REQUIRE_THROWS_WITH(call(delta, x, bad_y), Catch::Contains("out has 32 columns"));
  const cuda::SegmentTableView two_experts{1, 2, indices, items};
  REQUIRE_THROWS_WITH(cuda::multi_delta_matmul({delta}, x, two_experts, y, nullptr), Catch::Contains("built for 2"));
  REQUIRE_THROWS_WITH(cuda::build_segments(indices, 10, 0, indices, items, nullptr), Catch::Contains("0 experts"));
}
