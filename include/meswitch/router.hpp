// The model-level router: which expert should answer this query?
//
// Model selection posed as domain classification: text -> hashed n-gram features
// (text_features.hpp) -> a multinomial linear classifier -> softmax -> the most
// probable expert, or a fallback (the base model, or a named expert) when the
// classifier is not confident enough. It costs microseconds a query, so a server
// routes every request before it touches a model.
//
// A router is a directory (docs/format.md, "Router"):
//
//   router.json          format "meswitch-router", format_version 1, labels (the
//                        expert names, in class order), featurizer parameters,
//                        threshold, fallback, the weights file's name, and free-form
//                        "training" and "metrics" objects
//   weights.safetensors  "weight" [classes, 2^hash_bits] and "bias" [classes], float32
//                        (float16/bfloat16 are read too)
//
// Memory layout. The file stores the weights class-major, as trainers produce
// them; load() transposes them to bucket-major, [2^hash_bits][classes], so the
// scores of all classes for one feature sit in one cache line: a 300-character
// query touches ~1,100 random buckets, and one miss per bucket instead of one per
// (bucket, class) is what keeps a query under 20 microseconds.
//
// Decision rule, for features x (L2-normalised, sparse):
//   logits  = W x + b,  p = softmax(logits),  k = argmax p,  confidence = p[k]
//   expert  = labels[k]  if confidence >= threshold,  else fallback
// A text with no features (empty, or only separators) carries no evidence: it goes
// to the fallback with confidence 0 and all probabilities 0.
//
// A Router is immutable after load(): route() is const, keeps its scratch space on
// the stack of the calling thread, and may be called from any number of threads.
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "meswitch/error.hpp"
#include "meswitch/mapped_file.hpp"
#include "meswitch/output_directory.hpp"
#include "meswitch/safetensors.hpp"
#include "meswitch/text_features.hpp"

namespace meswitch {

inline constexpr const char* kRouterFormat = "meswitch-router";
inline constexpr int kRouterFormatVersion = 1;
inline constexpr const char* kRouterManifestFile = "router.json";
inline constexpr const char* kRouterFeaturizerName = "hashed-ngrams";
inline constexpr int kRouterFeaturizerVersion = 1;
inline constexpr OutputMarker kRouterMarker{"router.json", "meswitch-router", "a meswitch router"};
// The base model is always served, under this name; it is a valid fallback.
inline constexpr const char* kBaseModelName = "base";

struct RouteResult {
  std::string expert;               // labels[label], or the fallback
  int label = -1;                   // argmax class; -1 when there were no features
  float confidence = 0.0f;          // p[label]; 0 when there were no features
  bool fallback = false;            // true when `expert` is the fallback
  std::vector<float> probabilities; // one per label, in label order
};

// Everything a router file holds, in memory; weights class-major as stored.
struct RouterSpec {
  FeaturizerConfig featurizer;
  std::vector<std::string> labels;
  std::vector<float> weight;  // [labels.size(), featurizer.buckets()]
  std::vector<float> bias;    // [labels.size()]
  float threshold = 0.0f;
  std::string fallback = kBaseModelName;
  nlohmann::json training = nlohmann::json::object();
  nlohmann::json metrics = nlohmann::json::object();
};

namespace router_detail {

inline bool is_directory(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) throw FormatError(path, "", "cannot be opened (missing or unreadable)");
  std::stringstream text;
  text << stream.rdbuf();
  return text.str();
}

inline bool is_expert_name(const std::string& name) {
  if (name.empty() || name.size() > 128) return false;
  for (char c : name)
    if (std::uint8_t(c) <= 0x20 || c == 0x7F || c == '/' || c == '\\' || c == '=') return false;
  return true;
}

// Reads manifest["key"] as an int within [low, high], or throws naming the field.
inline long long json_int(const nlohmann::json& object, const char* key, long long low, long long high,
                          const std::string& file, const std::string& where) {
  const auto found = object.find(key);
  if (found == object.end()) throw FormatError(file, "", "'" + where + key + "' is missing");
  if (!found->is_number_integer()) throw FormatError(file, "", "'" + where + key + "' is not an integer");
  const long long value = found->get<long long>();
  if (value < low || value > high)
    throw FormatError(file, "", "'" + where + key + "' is " + std::to_string(value) + ", expected " +
                                    std::to_string(low) + ".." + std::to_string(high));
  return value;
}

inline std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

}  // namespace router_detail

// The manifest JSON of a router; the inverse of Router::load's checks.
inline nlohmann::json router_manifest(const RouterSpec& spec) {
  const FeaturizerConfig& f = spec.featurizer;
  return {{"format", kRouterFormat},
          {"format_version", kRouterFormatVersion},
          {"labels", spec.labels},
          {"featurizer",
           {{"name", kRouterFeaturizerName},
            {"version", kRouterFeaturizerVersion},
            {"hash", "fmix64(fnv1a64)"},
            {"hash_bits", f.hash_bits},
            {"word_ngrams", f.word_ngrams},
            {"char_ngram_min", f.char_ngram_min},
            {"char_ngram_max", f.char_ngram_max},
            {"max_input_bytes", f.max_input_bytes}}},
          {"threshold", spec.threshold},
          {"fallback", spec.fallback},
          {"weights", "weights.safetensors"},
          {"training", spec.training},
          {"metrics", spec.metrics}};
}

class Router {
 public:
  // `path` is a router directory or its router.json. Throws FormatError naming the
  // file and the problem for anything missing, malformed or inconsistent.
  static Router load(const std::string& path) {
    const std::string manifest_path = router_detail::is_directory(path) ? path + "/" + kRouterManifestFile : path;
    const std::size_t slash = manifest_path.find_last_of('/');
    const std::string directory = slash == std::string::npos ? "." : manifest_path.substr(0, slash);

    const std::string text = router_detail::read_text_file(manifest_path);
    const nlohmann::json manifest = nlohmann::json::parse(text, nullptr, false);
    if (manifest.is_discarded()) throw FormatError(manifest_path, "", "is not valid JSON");
    if (!manifest.is_object()) throw FormatError(manifest_path, "", "is not a JSON object");
    const auto format = manifest.find("format");
    if (format == manifest.end() || *format != kRouterFormat)
      throw FormatError(manifest_path, "", std::string("'format' is not \"") + kRouterFormat + "\"; not a router");
    router_detail::json_int(manifest, "format_version", kRouterFormatVersion, kRouterFormatVersion, manifest_path, "");

    RouterSpec spec;
    const auto labels = manifest.find("labels");
    if (labels == manifest.end() || !labels->is_array() || labels->empty())
      throw FormatError(manifest_path, "", "'labels' must be a non-empty array of expert names");
    std::set<std::string> seen;
    for (const auto& label : *labels) {
      if (!label.is_string() || !router_detail::is_expert_name(label.get<std::string>()))
        throw FormatError(manifest_path, "", "'labels' holds " + label.dump() + ", not an expert name");
      if (!seen.insert(label.get<std::string>()).second)
        throw FormatError(manifest_path, "", "'labels' names '" + label.get<std::string>() + "' twice");
      spec.labels.push_back(label.get<std::string>());
    }

    const auto featurizer = manifest.find("featurizer");
    if (featurizer == manifest.end() || !featurizer->is_object())
      throw FormatError(manifest_path, "", "'featurizer' is missing or not an object");
    if (featurizer->value("name", std::string()) != kRouterFeaturizerName)
      throw FormatError(manifest_path, "", std::string("'featurizer.name' is not \"") + kRouterFeaturizerName + "\"");
    router_detail::json_int(*featurizer, "version", kRouterFeaturizerVersion, kRouterFeaturizerVersion, manifest_path,
                     "featurizer.");
    FeaturizerConfig& config = spec.featurizer;
    config.hash_bits = int(router_detail::json_int(*featurizer, "hash_bits", 8, FeaturizerConfig::kMaxHashBits,
                                            manifest_path, "featurizer."));
    config.word_ngrams = int(router_detail::json_int(*featurizer, "word_ngrams", 0, FeaturizerConfig::kMaxWordNgrams,
                                              manifest_path, "featurizer."));
    config.char_ngram_min = int(router_detail::json_int(*featurizer, "char_ngram_min", 1, FeaturizerConfig::kMaxCharNgram,
                                                 manifest_path, "featurizer."));
    config.char_ngram_max = int(router_detail::json_int(*featurizer, "char_ngram_max", 1, FeaturizerConfig::kMaxCharNgram,
                                                 manifest_path, "featurizer."));
    config.max_input_bytes = std::size_t(router_detail::json_int(*featurizer, "max_input_bytes", 1,
                                                          (long long)FeaturizerConfig::kMaxInputBytes, manifest_path,
                                                          "featurizer."));
    if (const std::string problem = config.problem(); !problem.empty())
      throw FormatError(manifest_path, "", "featurizer: " + problem);

    const auto threshold = manifest.find("threshold");
    if (threshold == manifest.end() || !threshold->is_number() || !(threshold->get<double>() >= 0.0) ||
        threshold->get<double>() > 1.0)
      throw FormatError(manifest_path, "", "'threshold' must be a number in [0, 1]");
    spec.threshold = threshold->get<float>();
    const auto fallback = manifest.find("fallback");
    if (fallback == manifest.end() || !fallback->is_string() || !router_detail::is_expert_name(fallback->get<std::string>()))
      throw FormatError(manifest_path, "", "'fallback' must name an expert or \"base\"");
    spec.fallback = fallback->get<std::string>();
    for (const char* key : {"training", "metrics"}) {
      const auto found = manifest.find(key);
      if (found == manifest.end()) continue;
      if (!found->is_object()) throw FormatError(manifest_path, "", std::string("'") + key + "' is not an object");
      (key == std::string("training") ? spec.training : spec.metrics) = *found;
    }

    const auto weights_name = manifest.find("weights");
    if (weights_name == manifest.end() || !weights_name->is_string() ||
        !router_detail::is_expert_name(weights_name->get<std::string>()) || weights_name->get<std::string>() == "." ||
        weights_name->get<std::string>() == "..")
      throw FormatError(manifest_path, "", "'weights' must be a file name inside the router directory");
    const std::string weights_path = directory + "/" + weights_name->get<std::string>();
    struct stat info {};
    if (::stat(weights_path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
      throw FormatError(weights_path, "", "is missing or not a regular file (named by 'weights' in " +
                                              manifest_path + ")");
    const SafetensorsFile weights = SafetensorsFile::open(weights_path);
    const auto classes = std::int64_t(spec.labels.size());
    const auto expect = [&](const char* name, const Shape& shape) {
      const TensorInfo& info = weights.info(name);
      if (info.shape != shape)
        throw FormatError(weights_path, name, "shape " + shape_string(info.shape) + ", expected " +
                                                  shape_string(shape) + " (labels x 2^hash_bits)");
      std::vector<float> values = weights.read_f32(name);
      for (float value : values)
        if (!std::isfinite(value)) throw FormatError(weights_path, name, "holds a NaN or infinite value");
      return values;
    };
    spec.weight = expect("weight", {classes, std::int64_t(config.buckets())});
    spec.bias = expect("bias", {classes});
    for (const TensorInfo& info : weights.tensors())
      if (info.name != "weight" && info.name != "bias")
        throw FormatError(weights_path, info.name, "unexpected tensor in a router's weights");
    return Router(std::move(spec), manifest_path);
  }

  // load(), then check that every label (and a fallback other than "base") is among
  // `served`: a router for experts that are not there would send queries nowhere.
  static Router load(const std::string& path, const std::vector<std::string>& served) {
    Router router = load(path);
    const std::vector<std::string> missing = router.missing_experts(served);
    if (!missing.empty())
      throw FormatError(router.path(), "",
                        "routes to experts that are not served: " + router_detail::join(missing) + " (served: " +
                            (served.empty() ? std::string("none") : router_detail::join(served)) + ")");
    return router;
  }

  // An in-memory router, for trainers and tests; validated like a loaded one.
  explicit Router(RouterSpec spec, std::string path = "<memory>") : path_(std::move(path)) {
    if (const std::string problem = spec.featurizer.problem(); !problem.empty())
      throw FormatError(path_, "", "featurizer: " + problem);
    if (spec.labels.empty()) throw FormatError(path_, "", "a router needs at least one label");
    const std::size_t classes = spec.labels.size(), buckets = spec.featurizer.buckets();
    if (spec.weight.size() != classes * buckets || spec.bias.size() != classes)
      throw FormatError(path_, "weight", "expected " + std::to_string(classes) + " x " + std::to_string(buckets) +
                                             " weights and " + std::to_string(classes) + " biases");
    featurizer_ = Featurizer(spec.featurizer);
    weight_by_bucket_.resize(classes * buckets);
    for (std::size_t c = 0; c < classes; ++c)
      for (std::size_t j = 0; j < buckets; ++j) weight_by_bucket_[j * classes + c] = spec.weight[c * buckets + j];
    spec.weight.clear();
    spec.weight.shrink_to_fit();
    spec_ = std::move(spec);
  }

  const std::string& path() const { return path_; }
  const std::vector<std::string>& labels() const { return spec_.labels; }
  const std::string& fallback() const { return spec_.fallback; }
  float threshold() const { return spec_.threshold; }
  const Featurizer& featurizer() const { return featurizer_; }
  const nlohmann::json& training() const { return spec_.training; }
  const nlohmann::json& metrics() const { return spec_.metrics; }
  std::size_t classes() const { return spec_.labels.size(); }

  // Weight of (class, bucket), whatever the memory layout.
  float weight(std::size_t label, std::size_t bucket) const { return weight_by_bucket_[bucket * classes() + label]; }
  const std::vector<float>& bias() const { return spec_.bias; }

  // Labels (and a fallback other than "base") that are not in `served`, in label order.
  std::vector<std::string> missing_experts(const std::vector<std::string>& served) const {
    const std::set<std::string> available(served.begin(), served.end());
    std::vector<std::string> missing;
    for (const std::string& label : spec_.labels)
      if (!available.count(label)) missing.push_back(label);
    if (spec_.fallback != kBaseModelName && !available.count(spec_.fallback) &&
        std::find(missing.begin(), missing.end(), spec_.fallback) == missing.end())
      missing.push_back(spec_.fallback);
    return missing;
  }

  RouteResult route(std::string_view text) const { return route(featurizer_.features(text)); }

  RouteResult route(const SparseFeatures& features) const {
    RouteResult result;
    const std::size_t classes = spec_.labels.size();
    result.probabilities.assign(classes, 0.0f);
    if (features.empty()) {
      result.expert = spec_.fallback;
      result.fallback = true;
      return result;
    }
    // Up to 16 classes on the stack; more is unusual but allowed.
    double stack_logits[16];
    std::vector<double> heap_logits(classes > 16 ? classes : 0);
    double* logits = classes > 16 ? heap_logits.data() : stack_logits;
    for (std::size_t c = 0; c < classes; ++c) logits[c] = spec_.bias[c];
    for (std::size_t i = 0; i < features.index.size(); ++i) {
      const float* row = &weight_by_bucket_[std::size_t(features.index[i]) * classes];
      const double x = features.value[i];
      for (std::size_t c = 0; c < classes; ++c) logits[c] += x * row[c];
    }
    std::size_t best = 0;
    for (std::size_t c = 1; c < classes; ++c)
      if (logits[c] > logits[best]) best = c;
    double total = 0.0;
    for (std::size_t c = 0; c < classes; ++c) total += std::exp(logits[c] - logits[best]);
    for (std::size_t c = 0; c < classes; ++c)
      result.probabilities[c] = float(std::exp(logits[c] - logits[best]) / total);
    result.label = int(best);
    result.confidence = result.probabilities[best];
    result.fallback = result.confidence < spec_.threshold;
    result.expert = result.fallback ? spec_.fallback : spec_.labels[best];
    return result;
  }

  // The class-major weights as stored in a file (the transpose of the memory layout).
  std::vector<float> class_major_weights() const {
    const std::size_t classes = this->classes(), buckets = featurizer_.config().buckets();
    std::vector<float> out(classes * buckets);
    for (std::size_t c = 0; c < classes; ++c)
      for (std::size_t j = 0; j < buckets; ++j) out[c * buckets + j] = weight_by_bucket_[j * classes + c];
    return out;
  }

  RouterSpec spec() const {
    RouterSpec copy = spec_;
    copy.weight = class_major_weights();
    return copy;
  }

 private:
  RouterSpec spec_;                       // weight emptied: it lives transposed below
  std::vector<float> weight_by_bucket_;  // [buckets][classes]
  Featurizer featurizer_;
  std::string path_;
};

// Writes `spec` as a router directory at `directory`, atomically: the files are
// built in a staging sibling and moved into place with one rename
// (output_directory.hpp), so a reader sees the old router or the new one. An
// existing directory is replaced only when it is a router and `replace` is set.
inline void write_router(const std::string& directory, const RouterSpec& spec, bool replace = false) {
  Router validated(spec, directory);  // refuse to write what load() would refuse
  (void)validated;
  for (const std::string& label : spec.labels)
    if (!router_detail::is_expert_name(label)) throw FormatError(directory, "", "label '" + label + "' is not an expert name");
  if (!router_detail::is_expert_name(spec.fallback))
    throw FormatError(directory, "", "fallback '" + spec.fallback + "' is not an expert name");
  if (!(spec.threshold >= 0.0f && spec.threshold <= 1.0f))
    throw FormatError(directory, "", "threshold must be in [0, 1]");
  check_output_directory(directory, kRouterMarker, replace);
  const std::string staging = make_staging_directory(directory);
  try {
    // mkdtemp makes it private; a router is shipped and read by everyone, like its files.
    ::chmod(staging.c_str(), 0755);
    const auto classes = std::int64_t(spec.labels.size());
    const auto buckets = std::int64_t(spec.featurizer.buckets());
    write_safetensors(staging + "/weights.safetensors",
                      {{{"weight", DType::F32, {classes, buckets}}, spec.weight.data()},
                       {{"bias", DType::F32, {classes}}, spec.bias.data()}},
                      {{"format", kRouterFormat}});
    const std::string manifest = router_manifest(spec).dump(2) + "\n";
    AtomicFileWriter file(staging + "/" + kRouterManifestFile);
    file.write(manifest.data(), manifest.size());
    file.commit();
    check_output_directory(directory, kRouterMarker, replace);  // again: it may have changed meanwhile
    commit_directory(staging, directory);
  } catch (...) {
    detail::remove_tree(staging);
    throw;
  }
}

}  // namespace meswitch
