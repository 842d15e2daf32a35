// Device and pinned host memory owned by C++ callers, and a tiled delta uploaded to the
// device. (The Python package keeps its device memory in torch tensors instead, so that
// torch's allocator and streams stay in charge; both feed the kernels DeviceDeltaView.)
//
// Uploads go through pinned staging buffers with cudaMemcpyAsync on the caller's stream:
// pageable memory would make every copy synchronous. The staging buffer must outlive the
// copy, so DeviceDelta keeps it until the delta is destroyed or `release_staging` is
// called after the stream has passed the copy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/delta_gemm.hpp"
#include "meswitch/cuda/tiled_delta.hpp"

namespace meswitch::cuda {

// `count` elements of T in device memory (cudaMalloc), freed when this goes away.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count, const std::string& what = "device buffer") : count_(count) {
    if (count > 0)
      MESWITCH_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(T)),
                          "allocating " + std::to_string(count * sizeof(T)) + " bytes for " + what);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    return *this;
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);  // no throw from a destructor; a failed free leaks
  }

  T* data() const { return data_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

// `count` elements of T in page-locked host memory (cudaMallocHost).
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t count, const std::string& what = "pinned buffer") : count_(count) {
    if (count > 0)
      MESWITCH_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&data_), count * sizeof(T)),
                          "allocating " + std::to_string(count * sizeof(T)) + " pinned bytes for " + what);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  PinnedBuffer(PinnedBuffer&& other) noexcept { *this = std::move(other); }
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    return *this;
  }
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }

  T* data() const { return data_; }
  std::size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

// A compressed delta repacked and copied to the device.
class DeviceDelta {
 public:
  // Repacks `delta` (tile_delta_into, straight into pinned staging) and enqueues its
  // copy to the current device on `stream`.
  static DeviceDelta upload(const CompressedDelta& delta, cudaStream_t stream) {
    check_tileable(delta);
    DeviceDelta result;
    result.view_.name = delta.name;
    result.view_.rows = delta.rows;
    result.view_.cols = delta.cols;
    result.view_.group_size = delta.group_size;
    result.view_.k = delta.k;
    result.view_.bits = delta.bits;
    const TiledSizes sizes = TiledSizes::of(delta.rows, delta.cols, delta.bits, delta.groups(), delta.k);
    const std::string what = "delta '" + delta.name + "'";
    result.staging_codes_ = PinnedBuffer<std::uint32_t>(std::size_t(sizes.codes), what);
    result.staging_params_ = PinnedBuffer<std::uint32_t>(std::size_t(sizes.params), what);
    result.staging_idx_ = PinnedBuffer<std::int32_t>(std::size_t(sizes.salient_idx), what);
    result.staging_salient_ = PinnedBuffer<std::uint16_t>(std::size_t(sizes.salient), what);
    tile_delta_into(delta, result.staging_codes_.data(), result.staging_params_.data(), result.staging_idx_.data(),
                    result.staging_salient_.data());
    result.codes_ = copy_to_device(result.staging_codes_, stream, what);
    result.params_ = copy_to_device(result.staging_params_, stream, what);
    result.salient_idx_ = copy_to_device(result.staging_idx_, stream, what);
    result.salient_ = copy_to_device(result.staging_salient_, stream, what);
    result.view_.codes = result.codes_.data();
    result.view_.params = result.params_.data();
    result.view_.salient_idx = result.salient_idx_.data();
    result.view_.salient = result.salient_.data();
    return result;
  }

  const DeviceDeltaView& view() const { return view_; }
  std::size_t device_bytes() const {
    return codes_.bytes() + params_.bytes() + salient_idx_.bytes() + salient_.bytes();
  }

  // Frees the pinned staging; call once `stream` has passed the upload.
  void release_staging() {
    staging_codes_ = {};
    staging_params_ = {};
    staging_idx_ = {};
    staging_salient_ = {};
  }

 private:
  template <typename T>
  static DeviceBuffer<T> copy_to_device(const PinnedBuffer<T>& source, cudaStream_t stream, const std::string& what) {
    DeviceBuffer<T> buffer(source.size(), what);
    if (source.size() > 0)
      MESWITCH_CUDA_CHECK(cudaMemcpyAsync(buffer.data(), source.data(), source.size() * sizeof(T), cudaMemcpyHostToDevice, stream),
                          "uploading " + what);
    return buffer;
  }

  DeviceDeltaView view_;
  DeviceBuffer<std::uint32_t> codes_, params_;
  DeviceBuffer<std::int32_t> salient_idx_;
  DeviceBuffer<std::uint16_t> salient_;
  PinnedBuffer<std::uint32_t> staging_codes_, staging_params_;
  PinnedBuffer<std::int32_t> staging_idx_;
  PinnedBuffer<std::uint16_t> staging_salient_;
};

}  // namespace meswitch::cuda
