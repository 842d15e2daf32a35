// Lists the tensors of a safetensors checkpoint (file, sharded index or directory).
//
//   inspect_checkpoint PATH                 print name, dtype, shape of every tensor
//   inspect_checkpoint FILE --write-sample  first write a small sample file to FILE
#include <cstdio>
#include <string>
#include <vector>

#include "meswitch/meswitch.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PATH [--write-sample]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1];
  try {
    if (argc > 2 && std::string(argv[2]) == "--write-sample") {
      std::vector<float> weight(4 * 8);
      for (std::size_t i = 0; i < weight.size(); ++i) weight[i] = float(i) / 8.0f;
      std::vector<std::uint16_t> weight_bf16(weight.size());
      meswitch::convert_from_f32(weight.data(), meswitch::DType::BF16, weight_bf16.data(), weight.size());
      meswitch::write_safetensors(path, {{{"model.layers.0.mlp.up_proj.weight", meswitch::DType::BF16, {4, 8}},
                                          weight_bf16.data()}},
                                  {{"format", "pt"}});
    }
    const auto checkpoint = meswitch::SafetensorsCheckpoint::open(path);
    for (const std::string& name : checkpoint.names()) {
      const meswitch::TensorInfo& info = checkpoint.info(name);
      const std::vector<float> values = checkpoint.read_f32(name);
      double sum = 0;
      for (float value : values) sum += value;
      std::printf("%s %s %s sum=%g\n", name.c_str(), meswitch::dtype_name(info.dtype),
                  meswitch::shape_string(info.shape).c_str(), sum);
    }
  } catch (const meswitch::Error& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
  return 0;
}
