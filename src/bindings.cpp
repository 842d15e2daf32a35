// pybind11 bindings: argument checks and forwarding only; logic lives in the headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/meswitch.hpp"

namespace py = pybind11;
using namespace meswitch;

void bind_artifact(py::module_& m);
void bind_quantize(py::module_& m);
void bind_ops(py::module_& m);
void bind_router(py::module_& m);
void bind_store(py::module_& m);
void bind_tiles(py::module_& m);
#if MESWITCH_WITH_CUDA
void bind_cuda(py::module_& m);
#endif

namespace {

// A read-only NumPy array viewing the tensor inside the mapping, no copy.
py::array tensor_array(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const SafetensorsFile& file = checkpoint.file_of(name);
  return bindings::kept_array(file.mapping(), file.view(name));
}

py::capsule tensor_dlpack(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const SafetensorsFile& file = checkpoint.file_of(name);
  const TensorView view = file.view(name);
  if (!SafetensorsFile::is_aligned(view))
    throw FormatError(file.path(), name, "tensor is not aligned to its element size; use get() for a copy");
  DLManagedTensor* managed = managed_host_tensor(view, file.mapping());
  // A consumer renames the capsule to "used_dltensor" and owns the tensor; only an
  // unconsumed capsule frees it here.
  return py::capsule(managed, "dltensor", [](PyObject* capsule) {
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
      managed->deleter(managed);
    }
  });
}

py::dict tensor_info(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const TensorInfo& info = checkpoint.info(name);
  py::dict result;
  result["dtype"] = dtype_name(info.dtype);
  result["shape"] = info.shape;
  result["nbytes"] = info.nbytes();
  result["file"] = checkpoint.file_of(name).path();
  return result;
}

// Writes tensors given as (name, dtype name, shape, contiguous bytes) in one file.
void write_file(const std::string& path, const std::vector<py::tuple>& tensors,
                const std::map<std::string, std::string>& metadata) {
  std::vector<TensorData> entries;
  std::vector<py::buffer_info> keep_alive;
  for (const py::tuple& item : tensors) {
    if (item.size() != 4) throw py::value_error("each tensor is (name, dtype, shape, buffer)");
    TensorData entry;
    entry.spec.name = item[0].cast<std::string>();
    entry.spec.dtype = bindings::dtype_named(item[1].cast<std::string>());
    entry.spec.shape = item[2].cast<Shape>();
    py::buffer buffer = item[3].cast<py::buffer>();
    keep_alive.push_back(buffer.request());
    const py::buffer_info& info = keep_alive.back();
    const auto bytes = std::uint64_t(info.size) * std::uint64_t(info.itemsize);
    if (bytes != entry.spec.nbytes())
      throw FormatError(path, entry.spec.name, "buffer has " + std::to_string(bytes) + " bytes, dtype x shape needs " +
                                                   std::to_string(entry.spec.nbytes()));
    entry.data = info.ptr;
    entries.push_back(entry);
  }
  py::gil_scoped_release release;
  write_safetensors(path, entries, metadata);
}

template <typename Convert>
py::array_t<std::uint16_t> narrow(py::array_t<float, py::array::c_style | py::array::forcecast> input, Convert convert) {
  py::array_t<std::uint16_t> output(std::vector<py::ssize_t>(input.shape(), input.shape() + input.ndim()));
  const float* source = input.data();
  std::uint16_t* destination = output.mutable_data();
  for (py::ssize_t i = 0; i < input.size(); ++i) destination[i] = convert(source[i]);
  return output;
}

template <typename Convert>
py::array_t<float> widen(py::array_t<std::uint16_t, py::array::c_style | py::array::forcecast> input, Convert convert) {
  py::array_t<float> output(std::vector<py::ssize_t>(input.shape(), input.shape() + input.ndim()));
  const std::uint16_t* source = input.data();
  float* destination = output.mutable_data();
  for (py::ssize_t i = 0; i < input.size(); ++i) destination[i] = convert(source[i]);
  return output;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "meswitch C++ core";
  m.attr("__version__") = kVersion;

  static py::exception<FormatError> format_error(m, "FormatError", PyExc_ValueError);
  static py::exception<OutputPathError> output_path_error(m, "OutputPathError", PyExc_FileExistsError);
  static py::exception<TierFull> tier_full(m, "TierFull", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const FormatError& error) {
      py::set_error(format_error, error.what());
    } catch (const OutputPathError& error) {
      py::set_error(output_path_error, error.what());
    } catch (const TierFull& error) {
      py::set_error(tier_full, error.what());
    } catch (const IoError& error) {
      PyErr_SetString(PyExc_OSError, error.what());
    }
  });

  py::class_<SafetensorsCheckpoint>(m, "SafetensorsCheckpoint")
      .def_static("open", &SafetensorsCheckpoint::open, py::arg("path"),
                  py::call_guard<py::gil_scoped_release>())
      .def("names", &SafetensorsCheckpoint::names)
      .def("contains", &SafetensorsCheckpoint::contains, py::arg("name"))
      .def("__len__", &SafetensorsCheckpoint::size)
      .def_property_readonly("shard_paths", &SafetensorsCheckpoint::shard_paths)
      .def_property_readonly("source", &SafetensorsCheckpoint::source)
      .def_property_readonly("index_metadata", &SafetensorsCheckpoint::index_metadata)
      .def("file_metadata",
           [](const SafetensorsCheckpoint& self, const std::string& name) { return self.file_of(name).metadata(); },
           py::arg("name"))
      .def("info", &tensor_info, py::arg("name"))
      .def("array", &tensor_array, py::arg("name"))
      .def("dlpack", &tensor_dlpack, py::arg("name"))
      .def("release", &SafetensorsCheckpoint::release, py::arg("name"), py::arg("offset") = 0,
           py::arg("size") = SIZE_MAX);

  bind_artifact(m);
  bind_quantize(m);
  bind_ops(m);
  bind_router(m);
  bind_store(m);
  bind_tiles(m);
#if MESWITCH_WITH_CUDA
  bind_cuda(m);
  m.attr("CUDA") = true;
#else
  m.attr("CUDA") = false;  // built with MESWITCH_CUDA=OFF
#endif

  m.def("write_safetensors", &write_file, py::arg("path"), py::arg("tensors"), py::arg("metadata"));
  m.def("f32_to_f16_bits", [](py::array_t<float, py::array::c_style | py::array::forcecast> x) { return narrow(x, float_to_f16); });
  m.def("f32_to_bf16_bits", [](py::array_t<float, py::array::c_style | py::array::forcecast> x) { return narrow(x, float_to_bf16); });
  m.def("f16_bits_to_f32", [](py::array_t<std::uint16_t, py::array::c_style | py::array::forcecast> x) { return widen(x, f16_to_float); });
  m.def("bf16_bits_to_f32", [](py::array_t<std::uint16_t, py::array::c_style | py::array::forcecast> x) { return widen(x, bf16_to_float); });
}
