// Bindings for the quantization core (delta, salient selection, quantize, pack):
// argument checks and forwarding only, the work runs with the GIL released.
//
// Settings errors (meswitch::Error: bits 0 or 5, a group size that does not divide
// the width, a salient index out of range) surface as ValueError from these
// functions; bad data stays meswitch.FormatError (itself a ValueError).
//
// Arrays: f16 values (scales, salient) come back as numpy.float16. compute_delta
// takes float32, float16 or ml_dtypes.bfloat16 arrays (the dtype Checkpoint.get_array
// gives BF16 tensors); raw BF16 bits in a uint16 array are accepted when the dtype is
// named with base_dtype / expert_dtype="BF16".
#include <algorithm>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/delta.hpp"
#include "meswitch/gptq.hpp"
#include "meswitch/pack.hpp"
#include "meswitch/quantize.hpp"
#include "meswitch/salient.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IndexArray = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;

// Runs `work` without the GIL; settings errors become ValueError, data errors stay FormatError.
template <typename Work>
auto without_gil(Work&& work) -> decltype(work()) {
  try {
    py::gil_scoped_release release;
    return work();
  } catch (const FormatError&) {
    throw;
  } catch (const IoError&) {
    throw;
  } catch (const Error& error) {
    throw py::value_error(error.what());
  }
}

std::string named(const std::string& name) { return "tensor '" + name + "': "; }

template <typename T>
py::array_t<T> array_from(const std::vector<T>& values, std::vector<py::ssize_t> shape) {
  py::array_t<T> array(shape);
  if (!values.empty()) std::memcpy(array.mutable_data(), values.data(), values.size() * sizeof(T));
  return array;
}

// Hands the vector's buffer to NumPy without a copy (large deltas would double the peak memory).
template <typename T>
py::array_t<T> array_owning(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
  auto* owner = new std::vector<T>(std::move(values));
  py::capsule base(owner, [](void* pointer) { delete static_cast<std::vector<T>*>(pointer); });
  return py::array_t<T>(shape, owner->data(), base);
}

void require_matrix(const py::array& array, const char* what, const std::string& name) {
  if (array.ndim() != 2)
    throw py::value_error(named(name) + what + " must be 2-D [rows, cols], got " + std::to_string(array.ndim()) +
                          " dimensions");
}

const float* channel_weight_pointer(const std::optional<FloatArray>& channel_weight, py::ssize_t cols,
                                    const std::string& name) {
  if (!channel_weight) return nullptr;
  if (channel_weight->ndim() != 1 || channel_weight->shape(0) != cols)
    throw py::value_error(named(name) + "channel_weight must have shape (" + std::to_string(cols) + ",)");
  return channel_weight->data();
}

QuantSpec make_spec(int bits, std::int64_t group_size, int clip_grid, float min_clip, bool ragged_groups) {
  QuantSpec spec;
  spec.ragged_groups = ragged_groups;
  spec.bits = bits;
  spec.group_size = group_size;
  spec.clip_grid = clip_grid;
  spec.min_clip = min_clip;
  return spec;
}

py::dict quantized_dict(const CompressedDelta& q, const FloatArray& delta, const float* weight);

py::dict py_quantize_delta(const FloatArray& delta, const std::optional<FloatArray>& channel_weight,
                           const IndexArray& salient_idx, int bits, std::int64_t group_size, int clip_grid,
                           float min_clip, const std::string& name, bool ragged_groups) {
  require_matrix(delta, "delta", name);
  if (salient_idx.ndim() != 1) throw py::value_error(named(name) + "salient_idx must be 1-D");
  const std::int64_t rows = delta.shape(0), cols = delta.shape(1);
  const float* weight = channel_weight_pointer(channel_weight, cols, name);
  const std::vector<std::int32_t> indices(salient_idx.data(), salient_idx.data() + salient_idx.size());
  const QuantSpec spec = make_spec(bits, group_size, clip_grid, min_clip, ragged_groups);
  const CompressedDelta q =
      without_gil([&] { return quantize_delta(delta.data(), rows, cols, weight, indices, spec, name); });
  return quantized_dict(q, delta, weight);
}

// The stored pieces of q (read-only views of the arrays it owns, no copy), its shape and
// its activation-weighted error against delta.
py::dict quantized_dict(const CompressedDelta& q, const FloatArray& delta, const float* weight) {
  py::dict result;
  for (const DeltaPiece piece : kDeltaPieces)  // read-only views of the arrays q owns, no copy
    result[delta_piece_name(piece)] = bindings::kept_array(q.owner, q.view(piece));
  result["rows"] = q.rows;
  result["cols"] = q.cols;
  result["bits"] = q.bits;
  result["group_size"] = q.group_size;
  // Activation-weighted error of this quantization and the weighted norm of the delta,
  // computed row by row so no dense approximation is ever held.
  const DeltaError error = without_gil([&] { return quantization_error(q, delta.data(), weight); });
  result["error"] = error.error;
  result["reference"] = error.reference;
  return result;
}

const float* hessian_pointer(const FloatArray& hessian, py::ssize_t cols, const std::string& name) {
  if (hessian.ndim() != 2 || hessian.shape(0) != cols || hessian.shape(1) != cols)
    throw py::value_error(named(name) + "hessian must have shape (" + std::to_string(cols) + ", " +
                          std::to_string(cols) + ")");
  return hessian.data();
}

py::dict py_quantize_delta_gptq(const FloatArray& delta, const FloatArray& hessian, const IndexArray& salient_idx,
                                int bits, std::int64_t group_size, int clip_grid, float min_clip,
                                const std::string& name, bool ragged_groups, double damping, bool act_order,
                                bool static_groups, int num_threads) {
  require_matrix(delta, "delta", name);
  if (salient_idx.ndim() != 1) throw py::value_error(named(name) + "salient_idx must be 1-D");
  const std::int64_t rows = delta.shape(0), cols = delta.shape(1);
  const float* h = hessian_pointer(hessian, cols, name);
  const std::vector<std::int32_t> indices(salient_idx.data(), salient_idx.data() + salient_idx.size());
  const QuantSpec spec = make_spec(bits, group_size, clip_grid, min_clip, ragged_groups);
  GptqSpec gptq;
  gptq.damping = damping;
  gptq.act_order = act_order;
  gptq.static_groups = static_groups;
  gptq.num_threads = num_threads;
  const CompressedDelta q =
      without_gil([&] { return quantize_delta_gptq(delta.data(), rows, cols, h, indices, spec, gptq, name); });
  std::vector<float> diagonal(static_cast<std::size_t>(cols));
  for (std::int64_t c = 0; c < cols; ++c) diagonal[std::size_t(c)] = h[c * cols + c];
  return quantized_dict(q, delta, diagonal.data());
}

bindings::BorrowedDelta stored_delta(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                                     py::handle salient, std::int64_t rows, std::int64_t cols, int bits,
                                     std::int64_t group_size, const std::string& name) {
  return bindings::borrowed_delta({qweight, scales, zeros, salient_idx, salient}, name, rows, cols, bits, group_size,
                                  DeltaChecks::Contents);
}

py::array_t<float> py_dequantize_delta(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                                       py::handle salient, std::int64_t rows, std::int64_t cols, int bits,
                                       std::int64_t group_size, const std::string& name) {
  const bindings::BorrowedDelta q =
      stored_delta(qweight, scales, zeros, salient_idx, salient, rows, cols, bits, group_size, name);
  py::array_t<float> out({rows, cols});
  float* destination = out.mutable_data();
  without_gil([&] { dequantize_delta(q.delta, destination); });
  return out;
}

py::dict py_scale_free_parts(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                             py::handle salient, std::int64_t rows, std::int64_t cols, int bits,
                             std::int64_t group_size, const std::string& name) {
  const bindings::BorrowedDelta q =
      stored_delta(qweight, scales, zeros, salient_idx, salient, rows, cols, bits, group_size, name);
  py::array_t<float> centred({rows, cols}), salient_dense({rows, cols});
  float* centred_data = centred.mutable_data();
  float* salient_data = salient_dense.mutable_data();
  without_gil([&] { scale_free_parts(q.delta, centred_data, salient_data); });
  py::array_t<std::int64_t> column_group(cols);
  for (std::int64_t c = 0; c < cols; ++c) column_group.mutable_data()[c] = c / q.delta.group_size;
  py::dict result;
  result["centred"] = centred;
  result["salient"] = salient_dense;
  result["column_group"] = column_group;
  return result;
}

py::tuple py_hessian_weighted_error(py::handle qweight, py::handle scales, py::handle zeros, py::handle salient_idx,
                                    py::handle salient, std::int64_t rows, std::int64_t cols, int bits,
                                    std::int64_t group_size, const FloatArray& delta, const FloatArray& hessian,
                                    const std::string& name) {
  const bindings::BorrowedDelta q =
      stored_delta(qweight, scales, zeros, salient_idx, salient, rows, cols, bits, group_size, name);
  require_matrix(delta, "delta", name);
  if (delta.shape(0) != rows || delta.shape(1) != cols)
    throw py::value_error(named(name) + "delta must have shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
                          ")");
  const float* h = hessian_pointer(hessian, cols, name);
  const DeltaError error = without_gil([&] { return hessian_weighted_error(q.delta, delta.data(), h); });
  return py::make_tuple(error.error, error.reference);
}

py::array_t<double> py_channel_error_scores(const FloatArray& delta, const std::optional<FloatArray>& channel_weight,
                                            int bits, std::int64_t group_size, int clip_grid, float min_clip,
                                            const std::string& name, bool ragged_groups) {
  require_matrix(delta, "delta", name);
  const std::int64_t rows = delta.shape(0), cols = delta.shape(1);
  const float* weight = channel_weight_pointer(channel_weight, cols, name);
  const QuantSpec spec = make_spec(bits, group_size, clip_grid, min_clip, ragged_groups);
  const std::vector<double> values =
      without_gil([&] { return channel_error_scores(delta.data(), rows, cols, weight, spec, name); });
  return array_from(values, {py::ssize_t(values.size())});
}

py::array_t<std::int32_t> py_select_salient_channels(
    const py::array_t<double, py::array::c_style | py::array::forcecast>& scores, std::int64_t k) {
  if (scores.ndim() != 1) throw py::value_error("scores must be 1-D");
  const std::vector<double> values(scores.data(), scores.data() + scores.size());
  const std::vector<std::int32_t> chosen = without_gil([&] { return select_salient_channels(values, k); });
  return array_from(chosen, {py::ssize_t(chosen.size())});
}

py::array_t<std::uint32_t> py_pack_codes(
    const py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>& codes, int bits,
    const std::string& name) {
  require_matrix(codes, "codes", name);
  const std::int64_t rows = codes.shape(0), cols = codes.shape(1);
  const std::vector<std::uint32_t> words =
      without_gil([&] { return pack_codes(codes.data(), rows, cols, bits, name); });
  return array_from(words, {rows, packed_words_per_row(cols, bits)});
}

py::array_t<std::uint8_t> py_unpack_codes(
    const py::array_t<std::uint32_t, py::array::c_style | py::array::forcecast>& words, std::int64_t rows,
    std::int64_t cols, int bits) {
  if (bits < 1 || bits > 4) throw py::value_error("bits must be 1..4, got " + std::to_string(bits));
  if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be >= 0");
  if (words.size() != rows * packed_words_per_row(cols, bits))
    throw py::value_error("words has " + std::to_string(words.size()) + " elements, [" + std::to_string(rows) + ", " +
                          std::to_string(cols) + "] at " + std::to_string(bits) + " bits needs " +
                          std::to_string(rows * packed_words_per_row(cols, bits)));
  const std::vector<std::uint8_t> codes = without_gil([&] { return unpack_codes(words.data(), rows, cols, bits); });
  return array_from(codes, {rows, cols});
}

// A view of a NumPy array as a floating TensorView; `dtype_name` ("", "F32", "F16", "BF16")
// overrides the array's own dtype (uint16 bits of BF16). Non-floating arrays become views
// with their own dtype when meswitch knows it, so compute_delta reports them with the tensor name.
TensorView floating_view(const py::array& array, const std::string& dtype_name, const char* role,
                         const std::string& name) {
  const py::dtype dtype = array.dtype();
  const std::string numpy_name = py::str(py::object(dtype)).cast<std::string>();
  DType parsed;
  if (!dtype_name.empty()) {
    if (!parse_dtype(dtype_name, parsed) || !is_floating(parsed))
      throw py::value_error(named(name) + role + "_dtype must be F32, F16 or BF16, got '" + dtype_name + "'");
    if (std::size_t(dtype.itemsize()) != dtype_size(parsed))
      throw py::value_error(named(name) + role + " array of " + numpy_name + " cannot hold " + dtype_name);
  } else if (!bindings::dtype_of_numpy(dtype, parsed)) {
    throw FormatError(
        "", name,
        std::string(role) + " dtype " + numpy_name + " is not floating (expected float32, float16 or bfloat16)");
  }
  if (!(array.flags() & py::array::c_style)) throw py::value_error(named(name) + role + " array must be C-contiguous");
  return TensorView(const_cast<void*>(array.data()), parsed, Shape(array.shape(), array.shape() + array.ndim()));
}

py::tuple py_compute_delta(const py::array& base, const py::array& expert, const std::string& name,
                           const std::string& base_dtype, const std::string& expert_dtype) {
  const TensorView base_view = floating_view(base, base_dtype, "base", name);
  const TensorView expert_view = floating_view(expert, expert_dtype, "expert", name);
  DeltaTensor d = without_gil([&] { return compute_delta(base_view, expert_view, name); });
  const py::ssize_t rows = d.rows, cols = d.cols, extra_rows = d.extra_rows;
  return py::make_tuple(array_owning(std::move(d.delta), {rows, cols}), array_owning(std::move(d.extra), {extra_rows, cols}));
}

}  // namespace

void bind_quantize(py::module_& m) {
  const QuantSpec defaults;
  py::dict quant_defaults;
  quant_defaults["bits"] = defaults.bits;
  quant_defaults["group_size"] = defaults.group_size;
  quant_defaults["clip_grid"] = defaults.clip_grid;
  quant_defaults["min_clip"] = defaults.min_clip;
  quant_defaults["ragged_groups"] = defaults.ragged_groups;
  m.attr("QUANT_DEFAULTS") = quant_defaults;  // QuantSpec's defaults, read by CompressionSettings
  py::list pieces;
  for (const DeltaPiece piece : kDeltaPieces)
    pieces.append(py::make_tuple(delta_piece_name(piece), dtype_name(delta_piece_dtype(piece))));
  m.attr("DELTA_PIECES") = py::tuple(pieces);  // (suffix, safetensors dtype) of W.qweight ... in stored order

  m.def("quantize_delta", &py_quantize_delta, py::arg("delta"), py::arg("channel_weight"), py::arg("salient_idx"),
        py::arg("bits"), py::arg("group_size"), py::arg("clip_grid") = defaults.clip_grid,
        py::arg("min_clip") = defaults.min_clip, py::arg("name") = "", py::arg("ragged_groups") = defaults.ragged_groups,
        "Quantize a float32 delta [rows, cols]: dict of qweight (uint32 [rows, words]), scales (float16 "
        "[rows, groups]), zeros (uint8 [rows, groups]), salient_idx (int32 [k], ascending), salient (float16 "
        "[rows, k]) and rows, cols, bits, group_size (actual; = cols for group_size 0).");
  const GptqSpec gptq_defaults;
  py::dict gptq_dict;
  gptq_dict["damping"] = gptq_defaults.damping;
  gptq_dict["act_order"] = gptq_defaults.act_order;
  gptq_dict["static_groups"] = gptq_defaults.static_groups;
  m.attr("GPTQ_DEFAULTS") = gptq_dict;  // GptqSpec's defaults, read by CompressionSettings
  m.def("quantize_delta_gptq", &py_quantize_delta_gptq, py::arg("delta"), py::arg("hessian"), py::arg("salient_idx"),
        py::arg("bits"), py::arg("group_size"), py::arg("clip_grid") = defaults.clip_grid,
        py::arg("min_clip") = defaults.min_clip, py::arg("name") = "", py::arg("ragged_groups") = defaults.ragged_groups,
        py::arg("damping") = gptq_defaults.damping, py::arg("act_order") = gptq_defaults.act_order,
        py::arg("static_groups") = gptq_defaults.static_groups, py::arg("num_threads") = 0,
        "Error-compensating (GPTQ) quantization of a float32 delta [rows, cols] given the calibration Hessian "
        "E[x x^T] (float32 [cols, cols]) of the layer's input: the same dict as quantize_delta, its error weighted "
        "by diag(H).");
  m.def("hessian_weighted_error", &py_hessian_weighted_error, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("rows"), py::arg("cols"), py::arg("bits"),
        py::arg("group_size"), py::arg("delta"), py::arg("hessian"), py::arg("name") = "",
        "(sum_r e_r^T H e_r, sum_r d_r^T H d_r) in float64: the layer output error of the stored delta against "
        "delta (e = delta - dequantized) and the delta's own, for H = E[x x^T].");
  m.def("dequantize_delta", &py_dequantize_delta, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("rows"), py::arg("cols"), py::arg("bits"),
        py::arg("group_size"), py::arg("name") = "",
        "Dense float32 [rows, cols] from the stored pieces: (code - zero) * scale plus the salient scatter.");
  m.def("scale_free_parts", &py_scale_free_parts, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("salient_idx"), py::arg("salient"), py::arg("rows"), py::arg("cols"), py::arg("bits"),
        py::arg("group_size"), py::arg("name") = "",
        "dict of centred (float32 [rows, cols], code - zero), salient (float32 [rows, cols], the salient values in "
        "their columns) and column_group (int64 [cols]): dequantize_delta = centred * scales[:, column_group] + "
        "salient.");
  m.def("channel_error_scores", &py_channel_error_scores, py::arg("delta"), py::arg("channel_weight"), py::arg("bits"),
        py::arg("group_size"), py::arg("clip_grid") = defaults.clip_grid, py::arg("min_clip") = defaults.min_clip,
        py::arg("name") = "", py::arg("ragged_groups") = defaults.ragged_groups, "float64 [cols]: w_i * sum_r (D[r,i] - Q(D)[r,i])^2, Q quantizing with no salient channels.");
  m.def("select_salient_channels", &py_select_salient_channels, py::arg("scores"), py::arg("k"),
        "int32 indices of the k largest scores (ties: lower index), ascending.");
  m.def(
      "salient_count",
      [](double fraction, std::optional<std::int64_t> count, std::int64_t cols) {
        return without_gil([&] { return salient_count(fraction, count, cols); });
      },
      py::arg("fraction"), py::arg("count"), py::arg("cols"),
      "Salient channels kept in a matrix of `cols` input channels: `count` (capped at cols) when it is not "
      "None, else round(fraction * cols), at least 1 for a fraction > 0; fraction in [0, 1], else ValueError.");
  m.def("pack_codes", &py_pack_codes, py::arg("codes"), py::arg("bits"), py::arg("name") = "",
        "Pack uint8 codes [rows, cols] into uint32 words [rows, ceil(cols*bits/32)] (little-endian bitstream).");
  m.def("unpack_codes", &py_unpack_codes, py::arg("words"), py::arg("rows"), py::arg("cols"), py::arg("bits"),
        "Inverse of pack_codes: uint8 codes [rows, cols].");
  m.def("compute_delta", &py_compute_delta, py::arg("base"), py::arg("expert"), py::arg("name") = "",
        py::arg("base_dtype") = "", py::arg("expert_dtype") = "",
        "(delta float32 [rows, cols], extra float32 [extra_rows, cols]) = expert[:rows] - base and the expert's "
        "rows beyond the base's. Arrays: float32, float16 or ml_dtypes.bfloat16 (or uint16 with *_dtype='BF16').");
}
