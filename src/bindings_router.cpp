// pybind11 bindings of the router (router.hpp, text_features.hpp): argument checks
// and forwarding only, so Python and C++ share one featurizer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "meswitch/router.hpp"

namespace py = pybind11;
using namespace meswitch;

namespace {

// A str becomes UTF-8 with lone surrogates kept as their (ill-formed) 3-byte
// encodings, which the featurizer then replaces like any invalid UTF-8; bytes pass
// through unchanged. Either way no text is refused.
std::string text_bytes(const py::handle& text) {
  if (PyBytes_Check(text.ptr())) return std::string(py::reinterpret_borrow<py::bytes>(text));
  if (!PyUnicode_Check(text.ptr())) throw py::type_error("text must be str or bytes, not " +
                                                         std::string(py::str(py::type::handle_of(text).attr("__name__"))));
  PyObject* encoded = PyUnicode_AsEncodedString(text.ptr(), "utf-8", "surrogatepass");
  if (encoded == nullptr) throw py::error_already_set();
  return std::string(py::reinterpret_steal<py::bytes>(encoded));
}

std::vector<std::string> texts_bytes(const py::iterable& texts) {
  std::vector<std::string> out;
  for (const py::handle& text : texts) out.push_back(text_bytes(text));
  return out;
}

FeaturizerConfig config_from(int hash_bits, int word_ngrams, int char_ngram_min, int char_ngram_max,
                             std::size_t max_input_bytes) {
  const FeaturizerConfig config{hash_bits, word_ngrams, char_ngram_min, char_ngram_max, max_input_bytes};
  if (const std::string problem = config.problem(); !problem.empty()) throw py::value_error(problem);
  return config;
}

py::dict config_dict(const FeaturizerConfig& config) {
  py::dict out;
  out["hash_bits"] = config.hash_bits;
  out["word_ngrams"] = config.word_ngrams;
  out["char_ngram_min"] = config.char_ngram_min;
  out["char_ngram_max"] = config.char_ngram_max;
  out["max_input_bytes"] = config.max_input_bytes;
  return out;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& values) {
  py::array_t<T> out(py::ssize_t(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

// CSR arrays (indptr, indices, values) for scipy.sparse.csr_matrix.
py::tuple featurize_batch(const Featurizer& featurizer, const std::vector<std::string>& texts) {
  std::vector<std::int64_t> indptr{0};
  std::vector<std::int32_t> indices;
  std::vector<float> values;
  {
    py::gil_scoped_release release;
    std::vector<std::uint32_t> buckets;
    for (const std::string& text : texts) {
      buckets.clear();
      featurizer.hashed_ngrams(text, buckets);
      const SparseFeatures features = Featurizer::features_from_buckets(buckets, featurizer.config().hash_bits);
      indices.insert(indices.end(), features.index.begin(), features.index.end());
      values.insert(values.end(), features.value.begin(), features.value.end());
      indptr.push_back(std::int64_t(indices.size()));
    }
  }
  return py::make_tuple(to_array(indptr), to_array(indices), to_array(values));
}

}  // namespace

void bind_router(py::module_& m) {
  m.def("router_hash64", [](const py::bytes& data) { return hash64(std::string(data)); }, py::arg("data"),
        "fmix64(fnv1a64(data)), the featurizer's documented 64-bit hash");
  m.def("router_normalize_text",
        [](const py::object& text, std::size_t max_input_bytes) {
          return py::bytes(normalize_text(text_bytes(text), max_input_bytes));
        },
        py::arg("text"), py::arg("max_input_bytes") = FeaturizerConfig{}.max_input_bytes,
        "the normalised text T (UTF-8 bytes) the features are taken from");
  m.def("router_featurize",
        [](const py::object& text, int hash_bits, int word_ngrams, int char_ngram_min, int char_ngram_max,
           std::size_t max_input_bytes) {
          const Featurizer featurizer(
              config_from(hash_bits, word_ngrams, char_ngram_min, char_ngram_max, max_input_bytes));
          const std::string bytes = text_bytes(text);
          SparseFeatures features;
          {
            py::gil_scoped_release release;
            features = featurizer.features(bytes);
          }
          return py::make_tuple(to_array(features.index), to_array(features.value));
        },
        py::arg("text"), py::arg("hash_bits") = 18, py::arg("word_ngrams") = 2, py::arg("char_ngram_min") = 3,
        py::arg("char_ngram_max") = 5, py::arg("max_input_bytes") = FeaturizerConfig{}.max_input_bytes,
        "(bucket ids uint32, values float32) of one text");
  m.def("router_featurize_batch",
        [](const py::iterable& texts, int hash_bits, int word_ngrams, int char_ngram_min, int char_ngram_max,
           std::size_t max_input_bytes) {
          const Featurizer featurizer(
              config_from(hash_bits, word_ngrams, char_ngram_min, char_ngram_max, max_input_bytes));
          return featurize_batch(featurizer, texts_bytes(texts));
        },
        py::arg("texts"), py::arg("hash_bits") = 18, py::arg("word_ngrams") = 2, py::arg("char_ngram_min") = 3,
        py::arg("char_ngram_max") = 5, py::arg("max_input_bytes") = FeaturizerConfig{}.max_input_bytes,
        "CSR arrays (indptr int64, indices int32, values float32) of many texts");

  py::class_<RouteResult>(m, "RouteResult")
      .def_readonly("expert", &RouteResult::expert)
      .def_readonly("label", &RouteResult::label)
      .def_readonly("confidence", &RouteResult::confidence)
      .def_readonly("fallback", &RouteResult::fallback)
      .def_readonly("probabilities", &RouteResult::probabilities)
      .def("__repr__", [](const RouteResult& self) {
        return "RouteResult(expert='" + self.expert + "', confidence=" + std::to_string(self.confidence) +
               (self.fallback ? ", fallback=True)" : ")");
      });

  py::class_<Router>(m, "Router")
      .def_static(
          "load",
          [](const std::string& path, const std::optional<std::vector<std::string>>& experts) {
            py::gil_scoped_release release;
            return experts ? Router::load(path, *experts) : Router::load(path);
          },
          py::arg("path"), py::arg("experts") = py::none())
      .def("route", [](const Router& self, const py::object& text) {
            const std::string bytes = text_bytes(text);
            py::gil_scoped_release release;
            return self.route(bytes);
          },
          py::arg("text"))
      .def("route_batch", [](const Router& self, const py::iterable& texts) {
            const std::vector<std::string> bytes = texts_bytes(texts);
            std::vector<RouteResult> results;
            results.reserve(bytes.size());
            py::gil_scoped_release release;
            for (const std::string& text : bytes) results.push_back(self.route(text));
            return results;
          },
          py::arg("texts"))
      .def("featurize_batch", [](const Router& self, const py::iterable& texts) {
            return featurize_batch(self.featurizer(), texts_bytes(texts));
          },
          py::arg("texts"))
      .def("missing_experts", &Router::missing_experts, py::arg("served"))
      .def_property_readonly("path", &Router::path)
      .def_property_readonly("labels", &Router::labels)
      .def_property_readonly("fallback", &Router::fallback)
      .def_property_readonly("threshold", &Router::threshold)
      .def_property_readonly("featurizer", [](const Router& self) { return config_dict(self.featurizer().config()); })
      .def_property_readonly("training_json", [](const Router& self) { return self.training().dump(); })
      .def_property_readonly("metrics_json", [](const Router& self) { return self.metrics().dump(); })
      .def_property_readonly("bias", [](const Router& self) { return to_array(self.bias()); })
      .def_property_readonly("weight", [](const Router& self) {
        py::array_t<float> out({py::ssize_t(self.classes()), py::ssize_t(self.featurizer().config().buckets())});
        const std::vector<float> weights = self.class_major_weights();
        std::copy(weights.begin(), weights.end(), out.mutable_data());
        return out;
      });

  m.def("check_router_output",
        [](const std::string& path, bool replace) { check_output_directory(path, kRouterMarker, replace); },
        py::arg("path"), py::arg("replace") = false, "refuse an output path that is not a router to replace");
  m.def("write_router",
        [](const std::string& directory, const std::vector<std::string>& labels,
           py::array_t<float, py::array::c_style | py::array::forcecast> weight,
           py::array_t<float, py::array::c_style | py::array::forcecast> bias, float threshold,
           const std::string& fallback, const py::dict& featurizer, const std::string& training_json,
           const std::string& metrics_json, bool replace) {
          RouterSpec spec;
          spec.featurizer = config_from(featurizer["hash_bits"].cast<int>(), featurizer["word_ngrams"].cast<int>(),
                                        featurizer["char_ngram_min"].cast<int>(),
                                        featurizer["char_ngram_max"].cast<int>(),
                                        featurizer["max_input_bytes"].cast<std::size_t>());
          spec.labels = labels;
          if (weight.ndim() != 2 || std::size_t(weight.shape(0)) != labels.size() ||
              std::size_t(weight.shape(1)) != spec.featurizer.buckets())
            throw py::value_error("weight must have shape (labels, 2**hash_bits)");
          if (bias.ndim() != 1 || std::size_t(bias.shape(0)) != labels.size())
            throw py::value_error("bias must have shape (labels,)");
          spec.weight.assign(weight.data(), weight.data() + weight.size());
          spec.bias.assign(bias.data(), bias.data() + bias.size());
          spec.threshold = threshold;
          spec.fallback = fallback;
          spec.training = nlohmann::json::parse(training_json);
          spec.metrics = nlohmann::json::parse(metrics_json);
          py::gil_scoped_release release;
          write_router(directory, spec, replace);
        },
        py::arg("directory"), py::arg("labels"), py::arg("weight"), py::arg("bias"), py::arg("threshold"),
        py::arg("fallback"), py::arg("featurizer"), py::arg("training_json") = "{}",
        py::arg("metrics_json") = "{}", py::arg("replace") = false,
        "write a router directory atomically (router.hpp, write_router)");
}
