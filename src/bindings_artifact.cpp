// Bindings for the expert artifact: argument checks and forwarding only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bindings_common.hpp"
#include "meswitch/artifact.hpp"
#include "meswitch/quantize.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

void add_tensor(ArtifactWriter& writer, const std::string& name, const std::string& dtype_name,
                py::array array) {
  const DType dtype = bindings::dtype_named(dtype_name);
  if (!(array.flags() & py::array::c_style)) throw py::value_error("tensor '" + name + "' must be C-contiguous");
  if (std::size_t(array.itemsize()) != dtype_size(dtype))
    throw py::value_error("tensor '" + name + "': array item size " + std::to_string(array.itemsize()) +
                          " does not match dtype " + dtype_name);
  Shape shape(array.shape(), array.shape() + array.ndim());
  writer.add_tensor(name, dtype, shape, array.data());
}

const OutputMarker& output_marker(const std::string& kind) {
  if (kind == "artifact") return kArtifactMarker;
  if (kind == "decompressed") return kDecompressedMarker;
  throw py::value_error("output kind must be 'artifact' or 'decompressed', got '" + kind + "'");
}

std::vector<ProtectedPath> protected_paths(const std::vector<std::pair<std::string, std::string>>& inputs) {
  std::vector<ProtectedPath> paths;
  for (const auto& [role, path] : inputs) paths.push_back({role, path});
  return paths;
}

Sha256Kernel sha256_kernel_named(const std::string& name) {
  if (name == "auto") return Sha256Kernel::Auto;
  if (name == "portable") return Sha256Kernel::Portable;
  if (name == "sha-ni") return Sha256Kernel::ShaNi;
  throw py::value_error("sha256 kernel must be 'auto', 'portable' or 'sha-ni', got '" + name + "'");
}

}  // namespace

void bind_artifact(py::module_& m) {
  py::class_<ArtifactWriter>(m, "ArtifactWriter")
      .def(py::init([](const std::string& directory, std::uint64_t max_shard_bytes, bool replace,
                       const std::vector<std::pair<std::string, std::string>>& inputs) {
             return std::make_unique<ArtifactWriter>(directory, max_shard_bytes, replace, protected_paths(inputs));
           }),
           py::arg("directory"), py::arg("max_shard_bytes") = 128ull << 20, py::arg("replace") = false,
           py::arg("inputs") = std::vector<std::pair<std::string, std::string>>{})
      .def("add_tensor", &add_tensor, py::arg("name"), py::arg("dtype"), py::arg("array"))
      .def("add_file", &ArtifactWriter::add_file, py::arg("relative_path"), py::arg("source_path"))
      .def("add_file_content",
           [](ArtifactWriter& self, const std::string& relative_path, const py::bytes& content) {
             self.add_file_content(relative_path, std::string(content));
           },
           py::arg("relative_path"), py::arg("content"))
      .def("commit",
           [](ArtifactWriter& self, const std::string& manifest_json) {
             self.commit(nlohmann::json::parse(manifest_json));
           },
           py::arg("manifest_json"), py::call_guard<py::gil_scoped_release>())
      .def("abort", &ArtifactWriter::abort)
      .def_property_readonly("staging_directory", &ArtifactWriter::staging_directory);

  py::class_<ExpertArtifact, std::shared_ptr<ExpertArtifact>>(m, "ExpertArtifact")
      .def_static("open",
                  [](const std::string& directory, bool verify_checksums) {
                    return ExpertArtifact::open(directory, verify_checksums);
                  },
                  py::arg("directory"), py::arg("verify_checksums") = true,
                  py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("directory", &ExpertArtifact::directory)
      .def("manifest_json", [](const ExpertArtifact& self) { return self.manifest().dump(); })
      .def_property_readonly("record_serial", [](const ExpertArtifact& self) { return self.record()->serial; },
                             "the same number for every artifact opened from the same checked files (an expert "
                             "store's reloads), another after any of them changed")
      .def("side_files",
           [](const ExpertArtifact& self) {
             std::vector<std::string> paths;
             for (const ArtifactSideFile& file : self.side_files()) paths.push_back(file.path);
             return paths;
           })
      .def("read_side_file",
           [](const ExpertArtifact& self, const std::string& path) { return py::bytes(self.read_side_file(path)); },
           py::arg("path"))
      .def("has_stored", &ExpertArtifact::has_stored, py::arg("name"))
      .def("stored",
           [](const ExpertArtifact& self, const std::string& name) {
             return bindings::kept_array(self.mapping_of(name), self.stored(name));
           },
           py::arg("name"))
      .def("dequantized_delta",
           [](const ExpertArtifact& self, const std::string& weight) {
             const CompressedDelta delta = self.delta(weight);  // validated against the manifest
             py::array_t<float> out({delta.rows, delta.cols});
             float* destination = out.mutable_data();
             {
               py::gil_scoped_release release;
               dequantize_delta(delta, destination);
             }
             return out;
           },
           py::arg("weight"), "float32 [rows, cols]: the dequantized delta of a 'delta' weight (base rows only)")
      .def("validate_delta", [](const ExpertArtifact& self, const std::string& weight) { self.delta(weight); },
           py::arg("weight"), py::call_guard<py::gil_scoped_release>(),
           "raise FormatError unless the stored pieces of a 'delta' weight fit its layout and the format's rules")
      .def("stored_dtype", [](const ExpertArtifact& self, const std::string& name) {
        return std::string(dtype_name(self.stored(name).dtype));
      })
      .def("check_base",
           [](const ExpertArtifact& self, const std::string& base_path, const std::string& config_text) {
             self.check_base(SafetensorsCheckpoint::open(base_path), config_text);
           },
           py::arg("base_path"), py::arg("config_text"), py::call_guard<py::gil_scoped_release>());

  m.def("base_fingerprint",
        [](const std::string& base_path, const std::string& config_text) {
          return base_fingerprint(SafetensorsCheckpoint::open(base_path), config_text).dump();
        },
        py::arg("base_path"), py::arg("config_text"), py::call_guard<py::gil_scoped_release>());
  m.def("check_output_directory",
        [](const std::string& path, const std::string& kind, bool replace,
           const std::vector<std::pair<std::string, std::string>>& inputs) {
          check_output_directory(path, output_marker(kind), replace, protected_paths(inputs));
        },
        py::arg("path"), py::arg("kind"), py::arg("replace") = false,
        py::arg("inputs") = std::vector<std::pair<std::string, std::string>>{},
        "refuse an output path that is not ours to replace (see output_directory.hpp)");
  m.def("make_staging_directory", &make_staging_directory, py::arg("target"),
        "a fresh NAME.tmp.PID.XXXXXX beside target, after removing those of writers that no longer run");
  m.def("commit_directory", &commit_directory, py::arg("staging"), py::arg("target"),
        py::call_guard<py::gil_scoped_release>(), "move a complete staging directory into place in one step");
  m.def("output_marker_file", [](const std::string& kind) { return std::string(output_marker(kind).file); },
        py::arg("kind"));
  m.def("output_marker_format", [](const std::string& kind) { return std::string(output_marker(kind).format); },
        py::arg("kind"));
  m.def("sha256_file", &sha256_file, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("sha256_hex",
        [](const py::bytes& data, const std::string& kernel) {
          const Sha256Kernel chosen = sha256_kernel_named(kernel);
          const std::string_view bytes(data);
          py::gil_scoped_release release;
          return sha256_hex(bytes.data(), bytes.size(), chosen);
        },
        py::arg("data"), py::arg("kernel") = "auto", "hex sha256 with kernel 'auto', 'portable' or 'sha-ni'");
  m.def("sha256_kernel_supported",
        [](const std::string& kernel) { return sha256_kernel_supported(sha256_kernel_named(kernel)); },
        py::arg("kernel"));
  m.def("sha256_kernel", []() { return std::string(sha256_kernel_name()); }, "what sha256 runs on this CPU");
}
