// Any manifest.json text over a real artifact's shards and side files is either read
// completely or refused with a meswitch error; nothing else may escape (a JSON type
// error, an out-of-range read), and a manifest that opens must describe tensors that
// can be read whole.
//
// LLVMFuzzerInitialize writes a small artifact (two deltas, one with added vocabulary
// rows, a full tensor, a side file) into a temporary directory and, when the first
// corpus directory on the command line is empty, its manifest as the seed.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "meswitch/artifact.hpp"

namespace {

std::string g_directory;

void write_artifact(const std::string& directory, const std::string& side_source) {
  using meswitch::DType;
  meswitch::ArtifactWriter writer(directory, 256);  // several shards
  const std::int64_t rows = 2, cols = 64, words = cols * 2 / 32, groups = 2;
  std::vector<std::uint32_t> qweight(std::size_t(rows * words), 0x55555555u);  // every code 1 = the zero point
  std::vector<std::uint16_t> scales(std::size_t(rows * groups), 0x3c00), salient(std::size_t(rows), 0x4000);
  std::vector<std::uint8_t> zeros(std::size_t(rows * groups), 1);
  std::vector<std::int32_t> salient_idx = {5};
  std::vector<std::uint16_t> extra(std::size_t(cols), 0x3800);
  std::vector<float> norm(8, 1.0f);
  for (const std::string weight : {"a", "b"}) {
    writer.add_tensor(weight + ".qweight", DType::U32, {rows, words}, qweight.data());
    writer.add_tensor(weight + ".scales", DType::F16, {rows, groups}, scales.data());
    writer.add_tensor(weight + ".zeros", DType::U8, {rows, groups}, zeros.data());
    writer.add_tensor(weight + ".salient_idx", DType::I32, {1}, salient_idx.data());
    writer.add_tensor(weight + ".salient", DType::F16, {rows, 1}, salient.data());
  }
  writer.add_tensor("b.extra_rows", DType::F16, {1, cols}, extra.data());
  writer.add_tensor("norm.full", DType::F32, {8}, norm.data());
  writer.add_file("expert/config.json", side_source);
  const nlohmann::json delta = {{"kind", "delta"}, {"dtype", "F16"}, {"shape", {rows, cols}}, {"rows", rows},
                                {"cols", cols},    {"bits", 2},        {"group_size", 32},    {"salient", 1}};
  nlohmann::json with_extra = delta;
  with_extra["shape"] = {rows + 1, cols};
  with_extra["extra_rows"] = 1;
  writer.commit({{"name", "fuzz"},
                 {"domain", ""},
                 {"base", {{"fingerprint", std::string(64, 'a')}, {"config_sha256", std::string(64, 'b')},
                           {"tensors", nlohmann::json::object()}}},
                 {"expert_config", {{"model_type", "llama"}}},
                 {"quantization", {{"bits", 2}, {"group_size", 32}, {"salient", 0.01}, {"clip_grid", 1},
                                   {"min_clip", 0.5}, {"avg_bits", nullptr}, {"vocab_bits", nullptr},
                                   {"calibration", {{"kind", "weight-only"}}}}},
                 {"statistics", {{"delta_parameters", 256}, {"delta_storage_bits", 1000}, {"avg_bits", 3.9}}},
                 {"tensors", {{"a", delta}, {"b", with_extra}, {"norm", {{"kind", "full"}, {"dtype", "F32"}, {"shape", {8}}}}}}});
}

std::string read_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  std::stringstream text;
  text << stream.rdbuf();
  return text.str();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  char pattern[] = "/tmp/meswitch-fuzz-XXXXXX";
  if (::mkdtemp(pattern) == nullptr) std::abort();
  const std::string root = pattern;
  std::ofstream(root + "/config.json") << "{\"model_type\": \"llama\"}";
  g_directory = root + "/fuzz.meswitch";
  write_artifact(g_directory, root + "/config.json");
  for (int i = 1; i < *argc; ++i) {
    const std::string argument = (*argv)[i];
    if (argument.empty() || argument[0] == '-') continue;
    std::ofstream(argument + "/seed-manifest.json") << read_file(g_directory + "/manifest.json");
    break;
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const std::string text(reinterpret_cast<const char*>(data), size);
    const meswitch::ExpertArtifact artifact = meswitch::ExpertArtifact::from_manifest(g_directory, text);
    volatile std::uint64_t sink = 0;
    for (const std::string& weight : artifact.weight_names()) {
      if (artifact.kind(weight) != "delta") continue;
      const auto delta = artifact.delta(weight);
      // Every byte of every piece is readable: touch the last one of each.
      for (const meswitch::DeltaPiece piece : meswitch::kDeltaPieces) {
        const meswitch::TensorView view = delta.view(piece);
        if (view.nbytes() > 0) sink = sink + static_cast<const std::uint8_t*>(view.data)[view.nbytes() - 1];
      }
      const meswitch::TensorView extra = artifact.delta_extra_rows(weight);
      if (extra.data != nullptr) sink = sink + static_cast<const std::uint8_t*>(extra.data)[extra.nbytes() - 1];
    }
    for (const auto& file : artifact.side_files()) sink = sink + artifact.read_side_file(file.path).size();
  } catch (const meswitch::Error&) {
  }
  return 0;
}
