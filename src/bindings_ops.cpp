// Bindings for the fused CPU delta GEMM (cpu/delta_gemm.hpp): argument checks and
// forwarding only; the kernels run with the GIL released.
//
// Tensors come in without copies from anything with `__dlpack__` (torch CPU
// tensors, NumPy arrays) or, failing that, anything NumPy can view (read-only NumPy
// arrays, which DLPack cannot export; ml_dtypes.bfloat16 arrays). `out` is written
// in place. Wrong dtypes, shapes or devices raise ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "meswitch/cpu/delta_gemm.hpp"
#include "meswitch/dlpack.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

// A borrowed host tensor: a view plus whatever keeps its memory alive. A consumed
// DLPack tensor is released through its deleter when this goes away (with the GIL
// held: producers' deleters may touch Python objects).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;
  HostTensor(HostTensor&& other) noexcept { *this = std::move(other); }
  HostTensor& operator=(HostTensor&& other) noexcept {
    release();
    view = std::move(other.view);
    writable = other.writable;
    managed_ = other.managed_;
    array_ = std::move(other.array_);
    other.managed_ = nullptr;
    return *this;
  }
  ~HostTensor() { release(); }

  TensorView view;
  bool writable = true;

  void adopt(DLManagedTensor* managed) { managed_ = managed; }
  void keep(py::object array) { array_ = std::move(array); }

 private:
  void release() {
    if (managed_ != nullptr && managed_->deleter != nullptr) managed_->deleter(managed_);
    managed_ = nullptr;
  }
  DLManagedTensor* managed_ = nullptr;
  py::object array_;
};

std::string type_name(py::handle object) { return py::str(py::type::handle_of(object).attr("__name__")); }

// DType of a DLPack dtype; uint16 is taken as f16 bits where the argument allows it.
DType dlpack_dtype(DLDataType dtype, bool u16_is_f16, const char* name) {
  if (u16_is_f16 && dtype.code == kDLUInt && dtype.bits == 16 && dtype.lanes == 1) return DType::F16;
  try {
    return from_dlpack_dtype(dtype);
  } catch (const Error& error) {
    throw py::value_error(std::string(name) + ": " + error.what());
  }
}

DType numpy_dtype(const py::dtype& dtype, bool u16_is_f16, const char* name) {
  const char kind = dtype.kind();
  const auto size = dtype.itemsize();
  const std::string text = py::str(py::object(dtype));
  if (kind == 'f' && size == 4) return DType::F32;
  if (kind == 'f' && size == 2) return DType::F16;
  if (text == "bfloat16" && size == 2) return DType::BF16;
  if (kind == 'u' && size == 2 && u16_is_f16) return DType::F16;
  if (kind == 'i' && size == 4) return DType::I32;
  if (kind == 'u' && size == 1) return DType::U8;
  if (kind == 'u' && size == 4) return DType::U32;
  throw py::value_error(std::string(name) + ": unsupported dtype " + text);
}

HostTensor from_dlpack(py::handle object, bool u16_is_f16, const char* name) {
  py::capsule capsule = object.attr("__dlpack__")();
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    throw py::value_error(std::string(name) + ": __dlpack__ did not return an unconsumed 'dltensor' capsule");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  // From here on we own the tensor: rename so the capsule's destructor leaves it alone.
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  HostTensor tensor;
  tensor.adopt(managed);
  const DLTensor& dl = managed->dl_tensor;
  if (dl.device.device_type != kDLCPU && dl.device.device_type != kDLCUDAHost)
    throw py::value_error(std::string(name) + ": tensor is on device type " + std::to_string(int(dl.device.device_type)) +
                          "; the CPU kernels need host memory");
  const DType dtype = dlpack_dtype(dl.dtype, u16_is_f16, name);
  Shape shape(dl.shape, dl.shape + dl.ndim);
  Shape strides = dl.strides != nullptr ? Shape(dl.strides, dl.strides + dl.ndim) : contiguous_strides(shape);
  void* data = static_cast<char*>(dl.data) + dl.byte_offset;
  tensor.view = TensorView(data, dtype, std::move(shape), std::move(strides));
  return tensor;
}

HostTensor from_array(py::handle object, bool u16_is_f16, const char* name) {
  py::array array;
  try {
    array = py::array::ensure(object);
  } catch (...) {
  }
  if (!array) throw py::value_error(std::string(name) + ": expected an array or tensor, got " + type_name(object));
  if (!py::isinstance<py::array>(object))  // e.g. a list: a fresh array, never an output
    if (array.size() > 0 && std::string(name) == "out") throw py::value_error("out: must be an array or tensor, not " + type_name(object));
  HostTensor tensor;
  const DType dtype = numpy_dtype(array.dtype(), u16_is_f16, name);
  Shape shape(array.shape(), array.shape() + array.ndim()), strides;
  for (py::ssize_t i = 0; i < array.ndim(); ++i) {
    if (array.strides(i) % array.itemsize() != 0)
      throw py::value_error(std::string(name) + ": strides are not a multiple of the item size");
    strides.push_back(array.strides(i) / array.itemsize());
  }
  tensor.writable = array.writeable();
  tensor.view = TensorView(const_cast<void*>(array.data()), dtype, std::move(shape), std::move(strides));
  tensor.keep(array);
  return tensor;
}

HostTensor host_tensor(py::handle object, const char* name, bool u16_is_f16 = false) {
  if (object.is_none()) throw py::value_error(std::string(name) + ": got None");
  if (py::hasattr(object, "__dlpack__")) {
    try {
      return from_dlpack(object, u16_is_f16, name);
    } catch (py::error_already_set& error) {
      // NumPy refuses to export read-only arrays (and exotic dtypes) through DLPack;
      // its own array interface still views them without a copy.
      if (!error.matches(PyExc_BufferError) && !error.matches(PyExc_TypeError) && !error.matches(PyExc_RuntimeError))
        throw;
    }
  }
  return from_array(object, u16_is_f16, name);
}

// Settings errors from the core become ValueError.
template <typename Work>
void without_gil(Work&& work) {
  try {
    py::gil_scoped_release release;
    work();
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
}

struct ExpertTensors {
  HostTensor qweight, scales, zeros, salient_idx, salient;
  cpu::CompressedDelta delta;
};

ExpertTensors expert_tensors(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                             py::handle salient, int bits, std::int64_t group_size, std::int64_t cols,
                             const std::string& name) {
  ExpertTensors tensors;
  tensors.qweight = host_tensor(qweight, "qweight");
  tensors.scales = host_tensor(scales, "scales", true);
  tensors.zeros = host_tensor(zeros, "zeros");
  tensors.salient_idx = host_tensor(salient_idx, "salient_idx");
  tensors.salient = host_tensor(salient, "salient", true);
  // The width comes from x, so a mismatch is reported against x rather than as a
  // wrong qweight shape.
  const TensorView& q = tensors.qweight.view;
  if (bits >= 1 && bits <= 4 && q.rank() == 2 && q.shape[1] != (cols * bits + 31) / 32)
    throw py::value_error("x has shape [*, " + std::to_string(cols) + "] but " + (name.empty() ? "" : name + ": ") +
                          "qweight " + shape_string(q.shape) + " holds " + std::to_string(bits) + "-bit codes for " +
                          std::to_string(q.shape[1] * 32 / bits) + " columns (" + std::to_string((cols * bits + 31) / 32) +
                          " words per row expected)");
  try {
    tensors.delta = cpu::make_compressed_delta(tensors.qweight.view, tensors.scales.view, tensors.zeros.view,
                                               tensors.salient_idx.view, tensors.salient.view, bits, group_size, cols, name);
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
  return tensors;
}

HostTensor activations(py::handle x) {
  HostTensor tensor = host_tensor(x, "x");
  if (tensor.view.rank() != 2)
    throw py::value_error("x: expected 2-D [tokens, cols], got shape " + shape_string(tensor.view.shape));
  if (!is_floating(tensor.view.dtype))
    throw py::value_error(std::string("x: expected float32, bfloat16 or float16, got ") + dtype_name(tensor.view.dtype));
  return tensor;
}

// out: float32 [tokens, rows] with unit column stride, written in place.
HostTensor output(py::handle out, std::int64_t tokens, std::int64_t rows) {
  HostTensor tensor = host_tensor(out, "out");
  const TensorView& view = tensor.view;
  if (view.dtype != DType::F32) throw py::value_error(std::string("out: expected float32, got ") + dtype_name(view.dtype));
  if (view.rank() != 2 || view.shape[0] != tokens || view.shape[1] != rows)
    throw py::value_error("out: expected shape [" + std::to_string(tokens) + ", " + std::to_string(rows) + "], got " +
                          shape_string(view.shape));
  if (!tensor.writable) throw py::value_error("out: array is read-only");
  if (rows > 1 && view.strides[1] != 1)
    throw py::value_error("out: rows must be contiguous (column stride 1), got strides " + shape_string(view.strides));
  if (tokens > 1 && view.strides[0] < rows)
    throw py::value_error("out: row stride " + std::to_string(view.strides[0]) + " is smaller than the row length " +
                          std::to_string(rows));
  return tensor;
}

void delta_matmul(py::handle x, py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                  py::handle salient, int bits, std::int64_t group_size, py::handle out) {
  const HostTensor input = activations(x);
  const ExpertTensors expert =
      expert_tensors(qweight, scales, zeros, salient_idx, salient, bits, group_size, input.view.shape[1], "");
  const HostTensor result = output(out, input.view.shape[0], expert.delta.rows);
  float* y = result.view.data_as<float>();
  const std::int64_t stride = input.view.shape[0] > 1 ? result.view.strides[0] : expert.delta.rows;
  without_gil([&] { cpu::delta_matmul(expert.delta, input.view, y, stride); });
}

void multi_delta_matmul(py::handle x, const std::vector<py::tuple>& experts, const std::vector<std::int64_t>& segment_starts,
                        py::handle out) {
  const HostTensor input = activations(x);
  if (segment_starts.size() != experts.size() + 1)
    throw py::value_error("segment_starts: expected " + std::to_string(experts.size() + 1) + " entries (experts + 1), got " +
                          std::to_string(segment_starts.size()));
  std::vector<ExpertTensors> tensors;
  tensors.reserve(experts.size());
  std::vector<cpu::CompressedDelta> deltas;
  std::int64_t rows = -1;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const py::tuple& item = experts[e];
    if (item.size() != 7)
      throw py::value_error("experts[" + std::to_string(e) +
                            "]: expected (qweight, scales, zeros, salient_idx, salient, bits, group_size), got " +
                            std::to_string(item.size()) + " items");
    tensors.push_back(expert_tensors(item[0], item[1], item[2], item[3], item[4], item[5].cast<int>(),
                                     item[6].cast<std::int64_t>(), input.view.shape[1], "experts[" + std::to_string(e) + "]"));
    const std::int64_t expert_rows = tensors.back().delta.rows;
    if (rows >= 0 && expert_rows != rows)
      throw py::value_error("experts[" + std::to_string(e) + "]: has " + std::to_string(expert_rows) +
                            " output rows, experts[0] has " + std::to_string(rows));
    rows = expert_rows;
    deltas.push_back(tensors.back().delta);
  }
  if (experts.empty()) return;
  const HostTensor result = output(out, input.view.shape[0], rows);
  float* y = result.view.data_as<float>();
  const std::int64_t stride = input.view.shape[0] > 1 ? result.view.strides[0] : rows;
  without_gil([&] { cpu::multi_delta_matmul(deltas, input.view, segment_starts.data(), y, stride); });
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def("delta_matmul", &delta_matmul, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("bits"), py::arg("group_size"), py::arg("out"),
        "out[t] += x[t] @ dequant(delta)^T, in place (see meswitch.ops.delta_matmul)");
  m.def("multi_delta_matmul", &multi_delta_matmul, py::arg("x"), py::arg("experts"), py::arg("segment_starts"),
        py::arg("out"), "per-segment delta_matmul over tokens sorted by expert (see meswitch.ops.multi_delta_matmul)");
  m.def("cpu_kernel_path", [] { return std::string(cpu::cpu_path_name(cpu::resolve_cpu_path())); },
        "the CPU kernel path delta_matmul uses now (MESWITCH_CPU_PATH or the best this CPU has)");
}
