// Any byte string is a valid text for the featurizer: it must return sorted unique
// buckets inside 2^hash_bits with finite values of unit L2 norm (or nothing at all),
// and the normalised text it works on must be valid UTF-8. The first byte picks the
// featurizer parameters, so odd configurations are fuzzed too.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "meswitch/router.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  meswitch::FeaturizerConfig config;
  config.hash_bits = 8 + data[0] % 11;
  config.word_ngrams = (data[0] >> 3) % 4;
  config.char_ngram_min = 1 + (data[0] >> 5) % 4;
  config.char_ngram_max = config.char_ngram_min + (data[0] >> 6);
  config.max_input_bytes = 1 + (size * 7) % 4096;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  const meswitch::Featurizer featurizer(config);
  const meswitch::SparseFeatures features = featurizer.features(text);
  double squares = 0.0;
  for (std::size_t i = 0; i < features.index.size(); ++i) {
    if (features.index[i] >= config.buckets()) std::abort();
    if (i > 0 && features.index[i - 1] >= features.index[i]) std::abort();
    if (!std::isfinite(features.value[i]) || features.value[i] <= 0) std::abort();
    squares += double(features.value[i]) * features.value[i];
  }
  if (!features.index.empty() && std::fabs(squares - 1.0) > 1e-4) std::abort();

  // The normalised text decodes without a single replacement of its own bytes.
  const std::string normalized = meswitch::normalize_text(text, config.max_input_bytes);
  for (std::size_t i = 0; i < normalized.size();) {
    char32_t c;
    const std::size_t length = meswitch::detail::decode_utf8(normalized, i, c);
    if (c == meswitch::detail::kReplacementCharacter && length == 1) std::abort();
    i += length;
  }
  // Non-empty T always has a word, and " T " at least 3 characters.
  const bool must_have_features = config.word_ngrams > 0 || config.char_ngram_min <= 3;
  if (must_have_features && features.index.empty() != normalized.empty()) std::abort();
  return 0;
}
