// Bindings for the GPU tile layout's repack (cuda/tiled_delta.hpp): host code, bound in
// every build, so a delta is prepared for a GPU (into pinned staging buffers) by the same
// code whether or not this build has CUDA. Argument checks and forwarding only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "bindings_common.hpp"
#include "meswitch/cuda/segments.hpp"
#include "meswitch/cuda/tiled_delta.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

// A writable, contiguous host output of `count` elements of `dtype`.
bindings::HostTensor tiled_output(py::handle object, const char* name, DType dtype, std::int64_t count) {
  bindings::HostTensor tensor = bindings::host_tensor(object, name, dtype == DType::F16);
  const TensorView& view = tensor.view;
  if (!bindings::same_storage(view.dtype, dtype))
    throw py::value_error(std::string(name) + ": expected " + dtype_name(dtype) + ", got " + dtype_name(view.dtype));
  if (view.numel() != count)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(count) + " elements, got " +
                          std::to_string(view.numel()) + " (shape " + shape_string(view.shape) + ")");
  if (!view.is_contiguous()) throw py::value_error(std::string(name) + ": must be contiguous");
  if (!tensor.writable) throw py::value_error(std::string(name) + ": is read-only");
  return tensor;
}

py::dict tiled_sizes(std::int64_t rows, std::int64_t cols, int bits, std::int64_t group_size, std::int64_t k,
                     const std::string& name) {
  const std::int64_t group = group_size == 0 ? cols : group_size;
  try {
    cuda::check_tileable(rows, cols, bits, group, name);
  } catch (const FormatError& error) {
    throw py::value_error(error.what());
  }
  const cuda::TiledSizes sizes = cuda::TiledSizes::of(rows, cols, bits, (cols + group - 1) / group, k);
  py::dict result;
  result["codes"] = sizes.codes;
  result["params"] = sizes.params;
  result["salient_idx"] = sizes.salient_idx;
  result["salient"] = sizes.salient;
  result["bytes"] = sizes.bytes();
  return result;
}

void tile_delta_into(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                     py::handle salient, int bits, std::int64_t group_size, std::int64_t cols, py::handle codes_out,
                     py::handle params_out, py::handle salient_idx_out, py::handle salient_out,
                     const std::string& name) {
  const bindings::BorrowedDelta delta = bindings::borrowed_delta({qweight, scales, zeros, salient_idx, salient}, name, -1,
                                                                 cols, bits, group_size, DeltaChecks::Layout);
  try {
    cuda::check_tileable(delta.delta);
  } catch (const FormatError& error) {
    throw py::value_error(error.what());
  }
  const cuda::TiledSizes sizes = cuda::TiledSizes::of(delta.delta.rows, delta.delta.cols, delta.delta.bits,
                                                      delta.delta.groups(), delta.delta.k);
  const bindings::HostTensor codes = tiled_output(codes_out, "codes", DType::U32, sizes.codes);
  const bindings::HostTensor params = tiled_output(params_out, "params", DType::U32, sizes.params);
  const bindings::HostTensor indices = tiled_output(salient_idx_out, "salient_idx", DType::I32, sizes.salient_idx);
  const bindings::HostTensor values = tiled_output(salient_out, "salient", DType::F16, sizes.salient);
  py::gil_scoped_release release;
  cuda::tile_delta_into(delta.delta, codes.view.data_as<std::uint32_t>(), params.view.data_as<std::uint32_t>(),
                        indices.view.data_as<std::int32_t>(), values.view.data_as<std::uint16_t>());
}

}  // namespace

void bind_tiles(py::module_& m) {
  m.def("tiled_sizes", &tiled_sizes, py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group_size"),
        py::arg("k"), py::arg("name") = "",
        "element counts of the tile layout's arrays (codes, params, salient_idx, salient) and their bytes");
  m.def("tile_delta_into", &tile_delta_into, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("bits"), py::arg("group_size"), py::arg("cols"),
        py::arg("codes"), py::arg("params"), py::arg("salient_idx_out"), py::arg("salient_out"), py::arg("name") = "",
        "repack a delta's canonical pieces into the GPU tile layout, into the given host arrays");
  m.def("segment_capacity", &cuda::work_item_capacity, py::arg("tokens"), py::arg("experts"),
        "work items of a segment table for this many tokens and experts");
  m.def("segment_tokens_per_block", &cuda::tokens_per_block_for, py::arg("tokens"),
        "tokens per work item of a segment table for a batch of this size");
}
