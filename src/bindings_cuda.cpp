// Bindings for the CUDA kernels (cuda/delta_gemm.hpp, segments.hpp, dequantize.hpp):
// argument checks and forwarding only. Compiled only in builds with MESWITCH_CUDA.
//
// Device tensors come through DLPack without copies: each is exported with
// `__dlpack__(stream=s)` for the caller's stream s (torch's current stream), so the
// producer orders its pending work before ours, and every launch is enqueued on s.
// Errors name the argument (ValueError) or the failed CUDA call (RuntimeError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/delta_gemm.hpp"
#include "meswitch/cuda/dequantize.hpp"
#include "meswitch/cuda/segments.hpp"
#include "meswitch/cuda/tiled_delta.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

// A borrowed CUDA tensor and its device.
struct DeviceTensor {
  bindings::HostTensor memory;  // the view (of device memory) and the DLPack owner
  int device = -1;
};

// DLPack's number for a stream: 1 is the legacy default stream, 0 is not allowed.
py::int_ dlpack_stream(std::int64_t stream) { return py::int_(stream == 0 ? 1 : stream); }

DeviceTensor device_tensor(py::handle object, const char* name, std::int64_t stream, bool u16_as_f16 = false) {
  if (object.is_none()) throw py::value_error(std::string(name) + ": got None");
  if (!py::hasattr(object, "__dlpack__"))
    throw py::value_error(std::string(name) + ": expected a CUDA tensor (with __dlpack__), got " + bindings::type_name(object));
  DeviceTensor tensor;
  DLManagedTensor* managed = bindings::detail::adopt_capsule(object.attr("__dlpack__")(py::arg("stream") = dlpack_stream(stream)), name);
  tensor.memory.adopt(managed);
  try {
    tensor.memory.view = device_tensor_view(managed->dl_tensor, name, tensor.device, u16_as_f16);
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
  return tensor;
}

void require(bool condition, const std::string& message) {
  if (!condition) throw py::value_error(message);
}

// Every tensor of a call on one device; the launches go to that device.
class SameDevice {
 public:
  void add(const DeviceTensor& tensor, const char* name) {
    if (device_ < 0) device_ = tensor.device, first_ = name;
    else require(tensor.device == device_, std::string(name) + " is on cuda:" + std::to_string(tensor.device) + ", " +
                                               first_ + " on cuda:" + std::to_string(device_));
  }
  int device() const { return device_; }

 private:
  int device_ = -1;
  std::string first_;
};

// Makes `device` current for the scope and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    MESWITCH_CUDA_CHECK(cudaGetDevice(&previous_), "reading the current device");
    if (device >= 0 && device != previous_) {
      MESWITCH_CUDA_CHECK(cudaSetDevice(device), "selecting cuda:" + std::to_string(device));
      restore_ = true;
    }
  }
  ~DeviceScope() {
    if (restore_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// CUDA and core errors become Python exceptions with their message.
template <typename Work>
void run_translated(Work&& work) {
  try {
    work();
  } catch (const FormatError&) {
    throw;  // meswitch.FormatError (a ValueError), translated by the module
  } catch (const cuda::CudaError& error) {
    throw std::runtime_error(error.what());
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
}

const TensorView& contiguous_1d(const DeviceTensor& tensor, const char* name, DType dtype, std::int64_t count) {
  const TensorView& view = tensor.memory.view;
  require(bindings::same_storage(view.dtype, dtype), std::string(name) + ": expected " + dtype_name(dtype) + ", got " + dtype_name(view.dtype));
  require(view.numel() == count, std::string(name) + ": expected " + std::to_string(count) + " elements, got " +
                                     std::to_string(view.numel()) + " (shape " + shape_string(view.shape) + ")");
  require(view.is_contiguous(), std::string(name) + ": must be contiguous");
  return view;
}

// A 2-D matrix with unit column stride.
cuda::DeviceMatrix matrix(const DeviceTensor& tensor, const char* name) {
  const TensorView& view = tensor.memory.view;
  require(view.rank() == 2, std::string(name) + ": expected 2-D, got shape " + shape_string(view.shape));
  require(view.shape[1] <= 1 || view.strides[1] == 1,
          std::string(name) + ": rows must be contiguous (column stride 1), got strides " + shape_string(view.strides));
  const std::int64_t stride = view.shape[0] > 1 ? view.strides[0] : view.shape[1];
  return {view.data, view.dtype, view.shape[0], view.shape[1], stride};
}

// One expert's tiled delta: None (no delta for this linear) or
// (codes, params, salient_idx, salient, rows, cols, bits, group_size, name).
struct ExpertArgument {
  std::vector<DeviceTensor> tensors;
  cuda::DeviceDeltaView view;
};

ExpertArgument expert_argument(const py::handle& item, std::size_t index, std::int64_t stream, SameDevice& devices) {
  ExpertArgument expert;
  if (item.is_none()) return expert;
  const py::tuple fields = py::reinterpret_borrow<py::tuple>(item);
  const std::string label = "experts[" + std::to_string(index) + "]";
  require(fields.size() == 9, label + ": expected (codes, params, salient_idx, salient, rows, cols, bits, group_size, name)");
  cuda::DeviceDeltaView& view = expert.view;
  view.rows = fields[4].cast<std::int64_t>();
  view.cols = fields[5].cast<std::int64_t>();
  view.bits = fields[6].cast<int>();
  view.group_size = fields[7].cast<std::int64_t>();
  view.name = fields[8].cast<std::string>();
  if (view.name.empty()) view.name = label;
  if (view.group_size == 0) view.group_size = view.cols;
  try {
    cuda::check_tileable(view.rows, view.cols, view.bits, view.group_size, view.name);
  } catch (const FormatError& error) {
    throw py::value_error(error.what());
  }
  const char* names[] = {"codes", "params", "salient_idx", "salient"};
  for (int i = 0; i < 4; ++i) {
    expert.tensors.push_back(device_tensor(fields[i], names[i], stream, i == 3));
    devices.add(expert.tensors.back(), names[i]);
  }
  view.k = expert.tensors[2].memory.view.numel();
  const cuda::TiledSizes sizes = cuda::TiledSizes::of(view.rows, view.cols, view.bits, view.groups(), view.k);
  const auto piece = [&](int i, DType dtype, std::int64_t count) {
    return contiguous_1d(expert.tensors[std::size_t(i)], (view.name + "." + names[i]).c_str(), dtype, count).data;
  };
  view.codes = static_cast<const std::uint32_t*>(piece(0, DType::U32, sizes.codes));
  view.params = static_cast<const std::uint32_t*>(piece(1, DType::U32, sizes.params));
  view.salient_idx = static_cast<const std::int32_t*>(piece(2, DType::I32, sizes.salient_idx));
  view.salient = static_cast<const std::uint16_t*>(piece(3, DType::F16, sizes.salient));
  return expert;
}

// order: int32 [>= tokens]; items: int32 [capacity, 4] (WorkItem).
cuda::SegmentTableView segment_table(const DeviceTensor& order, const DeviceTensor& items, std::int64_t tokens,
                                     int experts) {
  try {
    cuda::check_segment_sizes(tokens, experts);
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
  const TensorView& order_view = order.memory.view;
  require(order_view.dtype == DType::I32 && order_view.is_contiguous() && order_view.numel() >= tokens,
          "order: expected contiguous int32 of at least " + std::to_string(tokens) + " elements, got " +
              dtype_name(order_view.dtype) + " " + shape_string(order_view.shape));
  const std::int64_t capacity = cuda::work_item_capacity(tokens, experts);
  const TensorView& items_view = items.memory.view;
  require(items_view.dtype == DType::I32 && items_view.is_contiguous() && items_view.shape == Shape{capacity, 4},
          "items: expected contiguous int32 [" + std::to_string(capacity) + ", 4] for " + std::to_string(tokens) +
              " tokens and " + std::to_string(experts) + " experts, got " + dtype_name(items_view.dtype) + " " +
              shape_string(items_view.shape));
  return {tokens, experts, order_view.data_as<const std::int32_t>(), items_view.data_as<const cuda::WorkItem>()};
}

void build_segments(py::handle expert_ids, int experts, py::handle order, py::handle items, std::int64_t stream) {
  SameDevice devices;
  const DeviceTensor ids = device_tensor(expert_ids, "expert_ids", stream);
  devices.add(ids, "expert_ids");
  const TensorView& ids_view = ids.memory.view;
  require(ids_view.rank() == 1 && ids_view.dtype == DType::I32 && ids_view.is_contiguous(),
          "expert_ids: expected contiguous 1-D int32, got " + std::string(dtype_name(ids_view.dtype)) + " " +
              shape_string(ids_view.shape));
  const DeviceTensor order_tensor = device_tensor(order, "order", stream);
  const DeviceTensor items_tensor = device_tensor(items, "items", stream);
  devices.add(order_tensor, "order");
  devices.add(items_tensor, "items");
  const cuda::SegmentTableView table = segment_table(order_tensor, items_tensor, ids_view.numel(), experts);
  run_translated([&] {
    const DeviceScope scope(devices.device());
    cuda::build_segments(ids_view.data_as<const std::int32_t>(), table.tokens, experts,
                         const_cast<std::int32_t*>(table.order), const_cast<cuda::WorkItem*>(table.items),
                         reinterpret_cast<cudaStream_t>(stream));
  });
}

void multi_delta_matmul(py::handle x, const std::vector<py::object>& experts, py::handle order, py::handle items,
                        py::handle out, std::int64_t stream) {
  SameDevice devices;
  const DeviceTensor x_tensor = device_tensor(x, "x", stream);
  const DeviceTensor out_tensor = device_tensor(out, "out", stream);
  devices.add(x_tensor, "x");
  devices.add(out_tensor, "out");
  require(out_tensor.memory.writable, "out: is read-only");
  std::vector<ExpertArgument> arguments;
  std::vector<cuda::DeviceDeltaView> views;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    arguments.push_back(expert_argument(experts[e], e, stream, devices));
    views.push_back(arguments.back().view);
  }
  const DeviceTensor order_tensor = device_tensor(order, "order", stream);
  const DeviceTensor items_tensor = device_tensor(items, "items", stream);
  devices.add(order_tensor, "order");
  devices.add(items_tensor, "items");
  const cuda::DeviceMatrix x_matrix = matrix(x_tensor, "x"), out_matrix = matrix(out_tensor, "out");
  const cuda::SegmentTableView table = segment_table(order_tensor, items_tensor, x_matrix.rows, int(experts.size()));
  run_translated([&] {
    const DeviceScope scope(devices.device());
    cuda::multi_delta_matmul(views, x_matrix, table, out_matrix, reinterpret_cast<cudaStream_t>(stream));
  });
}

void dequantize_delta(const py::object& expert, const std::string& activation, py::handle out, std::int64_t stream) {
  SameDevice devices;
  ExpertArgument argument = expert_argument(expert, 0, stream, devices);
  require(!expert.is_none(), "expert: got None");
  const DeviceTensor out_tensor = device_tensor(out, "out", stream);
  devices.add(out_tensor, "out");
  const cuda::DeviceMatrix out_matrix = matrix(out_tensor, "out");
  require(out_matrix.dtype == DType::F32 && out_matrix.rows == argument.view.rows && out_matrix.cols == argument.view.cols,
          "out: expected float32 [" + std::to_string(argument.view.rows) + ", " + std::to_string(argument.view.cols) +
              "], got " + dtype_name(out_matrix.dtype) + " " + shape_string(out_tensor.memory.view.shape));
  const DType dtype = bindings::dtype_named(activation);
  run_translated([&] {
    const DeviceScope scope(devices.device());
    cuda::dequantize_delta(argument.view, dtype, static_cast<float*>(out_matrix.data), out_matrix.row_stride,
                           reinterpret_cast<cudaStream_t>(stream));
  });
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::string device_error() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
  return count == 0 ? "no CUDA device found" : "";
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_build_segments", &build_segments, py::arg("expert_ids"), py::arg("experts"), py::arg("order"),
        py::arg("items"), py::arg("stream"), "build the segment table of a batch on its device (see meswitch.cuda)");
  m.def("cuda_multi_delta_matmul", &multi_delta_matmul, py::arg("x"), py::arg("experts"), py::arg("order"),
        py::arg("items"), py::arg("out"), py::arg("stream"),
        "out[t] += x[t] @ delta_e(t)^T for a mixed batch, one launch (see meswitch.cuda)");
  m.def("cuda_dequantize_delta", &dequantize_delta, py::arg("expert"), py::arg("activation"), py::arg("out"),
        py::arg("stream"), "a tiled delta dequantized on the device into float32 out");
  m.def("cuda_device_count", &device_count, "CUDA devices visible to this process (0 without a driver)");
  m.def("cuda_device_error", &device_error, "why no CUDA device is usable, or '' when one is");
}
