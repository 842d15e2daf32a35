// Bindings for the CPU GEMMs, the fused delta GEMM (cpu/delta_gemm.hpp) and the dense
// GEMM (cpu/dense_gemm.hpp): argument checks and forwarding only; the kernels run with
// the GIL released.
//
// Tensors come in without copies (bindings::host_tensor); `out` is written in place.
// Wrong dtypes, shapes or devices raise ValueError naming the argument; the delta's
// pieces are checked by CompressedDelta::over_views (meswitch.FormatError, a ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/cpu/delta_gemm.hpp"
#include "meswitch/cpu/dense_gemm.hpp"
#include "meswitch/cpu/dequantize_rows.hpp"
#include "meswitch/quantize.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

using bindings::BorrowedDelta;
using bindings::HostTensor;
using bindings::host_tensor;

using bindings::without_gil;

// The width comes from x, so a qweight of another width is reported against x. Per
// call only the layout is checked, as the kernels do (the contents scan would cost a
// good part of a decode step's kernel time); a delta's contents are validated where it
// enters: ExpertArtifact::open (every delta), the quantizer, dequantize_delta.
BorrowedDelta expert_delta(const std::array<py::handle, 5>& pieces, int bits, std::int64_t group_size,
                           const HostTensor& x, const std::string& name) {
  const std::int64_t cols = x.view.shape[1];
  return bindings::borrowed_delta(pieces, name, -1, cols, bits, group_size, DeltaChecks::Layout,
                                  "x has shape [*, " + std::to_string(cols) + "]");
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
  const BorrowedDelta expert = expert_delta({qweight, scales, zeros, salient_idx, salient}, bits, group_size, input, "");
  const HostTensor result = output(out, input.view.shape[0], expert.delta.rows);
  float* y = result.view.data_as<float>();
  const std::int64_t stride = input.view.shape[0] > 1 ? result.view.strides[0] : expert.delta.rows;
  without_gil([&] { cpu::delta_matmul(expert.delta, input.view, y, stride); });
}

// Rows of the dequantized delta (an embedding lookup): float32 [len(rows), cols].
py::array_t<float> delta_rows(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                              py::handle salient, int bits, std::int64_t group_size, std::int64_t cols,
                              py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> rows,
                              const std::string& name) {
  if (rows.ndim() != 1) throw py::value_error("rows: expected 1-D, got " + std::to_string(rows.ndim()) + "-D");
  const BorrowedDelta expert = bindings::borrowed_delta({qweight, scales, zeros, salient_idx, salient}, name, -1, cols,
                                                        bits, group_size, DeltaChecks::Layout);
  py::array_t<float> out({py::ssize_t(rows.shape(0)), py::ssize_t(cols)});
  float* destination = out.mutable_data();
  const std::int64_t* wanted = rows.data();
  without_gil([&] { dequantize_rows(expert.delta, wanted, rows.shape(0), destination); });
  return out;
}

// out [count, cols] float32 (rows contiguous) += rows first..first+count of the dequantized delta.
void add_delta_rows(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx, py::handle salient,
                    int bits, std::int64_t group_size, std::int64_t cols, std::int64_t first, py::handle out,
                    const std::string& name) {
  const BorrowedDelta expert = bindings::borrowed_delta({qweight, scales, zeros, salient_idx, salient}, name, -1, cols,
                                                        bits, group_size, DeltaChecks::Layout);
  const HostTensor target = host_tensor(out, "out");
  const TensorView& view = target.view;
  if (view.dtype != DType::F32) throw py::value_error(std::string("out: expected float32, got ") + dtype_name(view.dtype));
  if (view.rank() != 2 || view.shape[1] != cols)
    throw py::value_error("out: expected shape [*, " + std::to_string(cols) + "], got " + shape_string(view.shape));
  if (!target.writable) throw py::value_error("out: array is read-only");
  if (cols > 1 && view.strides[1] != 1)
    throw py::value_error("out: rows must be contiguous (column stride 1), got strides " + shape_string(view.strides));
  const std::int64_t count = view.shape[0];
  if (count > 1 && view.strides[0] < cols)
    throw py::value_error("out: row stride " + std::to_string(view.strides[0]) + " is smaller than the row length " +
                          std::to_string(cols));
  float* data = view.data_as<float>();
  const std::int64_t stride = count > 1 ? view.strides[0] : cols;
  without_gil([&] { cpu::add_dequantized_rows(expert.delta, first, count, data, stride); });
}

void multi_delta_matmul(py::handle x, const std::vector<py::tuple>& experts, const std::vector<std::int64_t>& segment_starts,
                        py::handle out) {
  const HostTensor input = activations(x);
  if (segment_starts.size() != experts.size() + 1)
    throw py::value_error("segment_starts: expected " + std::to_string(experts.size() + 1) + " entries (experts + 1), got " +
                          std::to_string(segment_starts.size()));
  std::vector<BorrowedDelta> tensors;
  tensors.reserve(experts.size());
  std::vector<CompressedDelta> deltas;
  std::int64_t rows = -1;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const py::tuple& item = experts[e];
    if (item.size() != 7)
      throw py::value_error("experts[" + std::to_string(e) +
                            "]: expected (qweight, scales, zeros, salient_idx, salient, bits, group_size), got " +
                            std::to_string(item.size()) + " items");
    tensors.push_back(expert_delta({item[0], item[1], item[2], item[3], item[4]}, item[5].cast<int>(),
                                   item[6].cast<std::int64_t>(), input, "experts[" + std::to_string(e) + "]"));
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

// out = x @ weight^T, written; weight and x are checked by the kernel's own rule
// (cpu::detail::check_dense_operands), whose errors name them.
void dense_matmul(py::handle x, py::handle weight, py::handle out) {
  const HostTensor input = host_tensor(x, "x");
  const HostTensor matrix = host_tensor(weight, "weight");
  without_gil([&] { cpu::detail::check_dense_operands(matrix.view, input.view); });
  const std::int64_t tokens = input.view.shape[0], rows = matrix.view.shape[0];
  const HostTensor result = output(out, tokens, rows);
  float* y = result.view.data_as<float>();
  const std::int64_t stride = tokens > 1 ? result.view.strides[0] : rows;
  without_gil([&] { cpu::dense_matmul(matrix.view, input.view, y, stride); });
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def("delta_matmul", &delta_matmul, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("bits"), py::arg("group_size"), py::arg("out"),
        "out[t] += x[t] @ dequant(delta)^T, in place (see meswitch.ops.delta_matmul)");
  m.def("delta_rows", &delta_rows, py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("salient_idx"),
        py::arg("salient"), py::arg("bits"), py::arg("group_size"), py::arg("cols"), py::arg("rows"), py::arg("name") = "");
  m.def("add_delta_rows", &add_delta_rows, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("bits"), py::arg("group_size"), py::arg("cols"),
        py::arg("first"), py::arg("out"), py::arg("name") = "");
  m.def("multi_delta_matmul", &multi_delta_matmul, py::arg("x"), py::arg("experts"), py::arg("segment_starts"),
        py::arg("out"), "per-segment delta_matmul over tokens sorted by expert (see meswitch.ops.multi_delta_matmul)");
  m.def("dense_matmul", &dense_matmul, py::arg("x"), py::arg("weight"), py::arg("out"),
        "out = x @ weight^T, written in place (see meswitch.ops.dense_matmul)");
  m.def("cpu_kernel_path", [] { return std::string(cpu::cpu_path_name(cpu::resolve_cpu_path())); },
        "the CPU kernel path delta_matmul uses now (MESWITCH_CPU_PATH or the best this CPU has)");
}
