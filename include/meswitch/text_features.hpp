// Text -> hashed sparse features, the input of the router (router.hpp).
//
// The featurizer is fastText's idea kept small: words, word bigrams and character
// n-grams, each hashed into one of 2^b buckets, so there is no vocabulary to store
// and an unseen word still lands on buckets its n-grams share with seen ones. Every
// step is defined byte for byte below, because a router file is only meaningful
// with the exact featurizer it was trained on (tests/python/test_router.py holds a
// plain-Python transcription of this comment and checks it against this code).
//
// 1. Input. The first `max_input_bytes` bytes of the text are read (16 KiB by
//    default: a prompt's domain shows long before that, and latency stays bounded
//    for a 1 MB paste); the rest is ignored.
// 2. UTF-8 decoding. Each well-formed sequence (RFC 3629: shortest form, no
//    surrogates, at most U+10FFFF) gives its code point. Any other byte, including
//    the first byte of a sequence cut by the limit, becomes U+FFFD and decoding
//    resumes at the next byte. Nothing is ever rejected.
// 3. Normalisation, per code point: A-Z -> a-z (ASCII only; full Unicode case
//    folding would need tables and buys little for domain classification); 0-9 ->
//    '0' (the domain rarely depends on which number); U+0000-U+0020 and U+007F
//    (controls, NUL, tab, newline, space) are separators. Runs of separators become
//    one space; leading and trailing ones are dropped. The result is the
//    normalised text T, UTF-8 encoded.
// 4. Features, each a byte string hashed to a bucket:
//      word n-grams, n = 1 .. word_ngrams:  0x77 ('w') w_i 0x20 w_i+1 ... w_i+n-1
//      char n-grams, n = char_min .. char_max: 0x63 ('c') c_j ... c_j+n-1
//    where w are the space-separated words of T and c the code points (as UTF-8) of
//    " " + T + " " (the padding marks word starts and ends at the text's edges).
//    The leading byte keeps the word "the" and the character trigram "the" apart.
//    Empty T gives no features.
// 5. Hash: hash64(bytes) = fmix64(fnv1a64(bytes)): FNV-1a 64 (offset basis
//    0xcbf29ce484222325, prime 0x100000001b3) followed by MurmurHash3's 64-bit
//    finaliser, because FNV's low and high bits are weak on short keys and the
//    bucket is taken from the top: bucket = hash64 >> (64 - b).
//    Reference values are listed in docs/format.md and checked by the tests.
// 6. Values: a bucket hit c times gets 1 + ln(c) (repeats count, but sub-linearly,
//    so a long code listing is not "more code" than a short one), then the vector is
//    divided by its L2 norm. Features come out sorted by bucket, buckets unique.
//
// Cost: one pass over the text, each character n-gram hashed incrementally (the
// 5-gram at j extends the 3- and 4-grams at j), then a radix sort of the bucket ids;
// about 1,000 feature occurrences for a 300-character query.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace meswitch {

// FNV-1a 64 over `size` bytes, continuing from `state` (the offset basis by default),
// so features sharing a prefix are hashed once per prefix.
inline constexpr std::uint64_t kFnvOffsetBasis = 0xcbf29ce484222325ull;
inline constexpr std::uint64_t kFnvPrime = 0x100000001b3ull;

inline std::uint64_t fnv1a64(const void* data, std::size_t size, std::uint64_t state = kFnvOffsetBasis) {
  const auto* bytes = static_cast<const std::uint8_t*>(data);
  for (std::size_t i = 0; i < size; ++i) state = (state ^ bytes[i]) * kFnvPrime;
  return state;
}

// MurmurHash3's fmix64: every input bit affects every output bit.
inline std::uint64_t fmix64(std::uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// The stable, documented hash of the featurizer (point 5 at the top of this file).
inline std::uint64_t hash64(std::string_view bytes) { return fmix64(fnv1a64(bytes.data(), bytes.size())); }

struct FeaturizerConfig {
  int hash_bits = 18;                   // 2^hash_bits buckets
  int word_ngrams = 2;                  // word n-grams for n = 1 .. word_ngrams
  int char_ngram_min = 3;               // character n-grams for n = min .. max
  int char_ngram_max = 5;
  std::size_t max_input_bytes = 16384;  // bytes of input read; the rest is ignored

  static constexpr int kMaxHashBits = 24;
  static constexpr int kMaxWordNgrams = 3;
  static constexpr int kMaxCharNgram = 8;
  static constexpr std::size_t kMaxInputBytes = std::size_t(1) << 24;

  std::size_t buckets() const { return std::size_t(1) << hash_bits; }

  // Empty when usable, otherwise what is wrong, for an error message.
  std::string problem() const {
    if (hash_bits < 8 || hash_bits > kMaxHashBits)
      return "hash_bits " + std::to_string(hash_bits) + " is outside 8.." + std::to_string(kMaxHashBits);
    if (word_ngrams < 0 || word_ngrams > kMaxWordNgrams)
      return "word_ngrams " + std::to_string(word_ngrams) + " is outside 0.." + std::to_string(kMaxWordNgrams);
    if (char_ngram_min < 1 || char_ngram_max > kMaxCharNgram || char_ngram_min > char_ngram_max)
      return "char n-gram range " + std::to_string(char_ngram_min) + ".." + std::to_string(char_ngram_max) +
             " is not within 1.." + std::to_string(kMaxCharNgram);
    if (max_input_bytes < 1 || max_input_bytes > kMaxInputBytes)
      return "max_input_bytes " + std::to_string(max_input_bytes) + " is outside 1.." + std::to_string(kMaxInputBytes);
    return {};
  }
};

// A sparse, L2-normalised feature vector: sorted unique bucket ids and their values.
struct SparseFeatures {
  std::vector<std::uint32_t> index;
  std::vector<float> value;

  bool empty() const { return index.empty(); }
};

namespace detail {

inline constexpr char32_t kReplacementCharacter = 0xFFFD;

// Decodes the code point starting at text[i] (point 2 at the top); returns its length
// in bytes (1 for a replaced byte).
inline std::size_t decode_utf8(std::string_view text, std::size_t i, char32_t& code_point) {
  const auto byte = [&](std::size_t k) { return std::uint8_t(text[i + k]); };
  const std::size_t left = text.size() - i;
  const std::uint8_t lead = byte(0);
  code_point = kReplacementCharacter;
  if (lead < 0x80) {
    code_point = lead;
    return 1;
  }
  std::size_t length;
  char32_t value, minimum;
  if (lead >= 0xC2 && lead <= 0xDF) length = 2, value = lead & 0x1F, minimum = 0x80;
  else if (lead >= 0xE0 && lead <= 0xEF) length = 3, value = lead & 0x0F, minimum = 0x800;
  else if (lead >= 0xF0 && lead <= 0xF4) length = 4, value = lead & 0x07, minimum = 0x10000;
  else return 1;
  if (left < length) return 1;
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(k) & 0xC0) != 0x80) return 1;
    value = (value << 6) | (byte(k) & 0x3F);
  }
  if (value < minimum || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 1;
  code_point = value;
  return length;
}

inline void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

inline std::uint32_t bucket_of(std::uint64_t fnv_state, int hash_bits) {
  return std::uint32_t(fmix64(fnv_state) >> (64 - hash_bits));
}

}  // namespace detail

// Points 1-3 at the top of this file: the normalised text T.
inline std::string normalize_text(std::string_view text, std::size_t max_input_bytes) {
  if (text.size() > max_input_bytes) text = text.substr(0, max_input_bytes);
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (std::size_t i = 0; i < text.size();) {
    char32_t c;
    i += detail::decode_utf8(text, i, c);
    if (c <= 0x20 || c == 0x7F) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
    else if (c >= '0' && c <= '9') c = '0';
    detail::append_utf8(out, c);
  }
  return out;
}

class Featurizer {
 public:
  Featurizer() = default;
  explicit Featurizer(const FeaturizerConfig& config) : config_(config) {}

  const FeaturizerConfig& config() const { return config_; }

  // The bucket of every feature occurrence (point 4), unsorted, repeats kept;
  // appended to `buckets`.
  void hashed_ngrams(std::string_view text, std::vector<std::uint32_t>& buckets) const {
    const std::string normalized = normalize_text(text, config_.max_input_bytes);
    if (normalized.empty()) return;
    const int bits = config_.hash_bits;

    // Word n-grams: the bigram's hash continues from the unigram's state.
    if (config_.word_ngrams > 0) {
      std::vector<std::string_view> words;
      for (std::size_t start = 0; start <= normalized.size();) {
        std::size_t end = normalized.find(' ', start);
        if (end == std::string::npos) end = normalized.size();
        words.emplace_back(normalized.data() + start, end - start);
        start = end + 1;
      }
      const std::uint8_t kind = 'w', space = ' ';
      for (std::size_t i = 0; i < words.size(); ++i) {
        std::uint64_t state = fnv1a64(&kind, 1);
        for (std::size_t n = 1; n <= std::size_t(config_.word_ngrams) && i + n <= words.size(); ++n) {
          if (n > 1) state = fnv1a64(&space, 1, state);
          state = fnv1a64(words[i + n - 1].data(), words[i + n - 1].size(), state);
          buckets.push_back(detail::bucket_of(state, bits));
        }
      }
    }

    // Character n-grams over " " + T + " ": the offsets of code point starts.
    const std::string padded = " " + normalized + " ";
    std::vector<std::uint32_t> starts;
    starts.reserve(padded.size() + 1);
    for (std::size_t i = 0; i < padded.size(); ++i)
      if ((std::uint8_t(padded[i]) & 0xC0) != 0x80) starts.push_back(std::uint32_t(i));
    starts.push_back(std::uint32_t(padded.size()));
    const std::size_t characters = starts.size() - 1;
    const std::uint8_t kind = 'c';
    const std::uint64_t seed = fnv1a64(&kind, 1);
    for (std::size_t j = 0; j + std::size_t(config_.char_ngram_min) <= characters; ++j) {
      std::uint64_t state = seed;
      for (std::size_t n = 1; n <= std::size_t(config_.char_ngram_max) && j + n <= characters; ++n) {
        state = fnv1a64(padded.data() + starts[j + n - 1], starts[j + n] - starts[j + n - 1], state);
        if (n >= std::size_t(config_.char_ngram_min)) buckets.push_back(detail::bucket_of(state, bits));
      }
    }
  }

  // Point 6: sorted unique buckets, 1 + ln(count), L2-normalised.
  SparseFeatures features(std::string_view text) const {
    std::vector<std::uint32_t> buckets;
    hashed_ngrams(text, buckets);
    return features_from_buckets(buckets, config_.hash_bits);
  }

  // Sorts `buckets` in place and turns the run lengths into values.
  static SparseFeatures features_from_buckets(std::vector<std::uint32_t>& buckets, int hash_bits = 24) {
    SparseFeatures result;
    sort_buckets(buckets, hash_bits);
    result.index.reserve(buckets.size());
    std::vector<double> values;
    values.reserve(buckets.size());
    double squares = 0.0;
    for (std::size_t i = 0; i < buckets.size();) {
      std::size_t j = i + 1;
      while (j < buckets.size() && buckets[j] == buckets[i]) ++j;
      const double value = count_value(j - i);
      result.index.push_back(buckets[i]);
      values.push_back(value);
      squares += value * value;
      i = j;
    }
    // Normalised in double and rounded to float once, so any faithful
    // transcription of point 6 gives the same floats.
    const double scale = squares > 0.0 ? 1.0 / std::sqrt(squares) : 0.0;
    result.value.reserve(values.size());
    for (double value : values) result.value.push_back(float(value * scale));
    return result;
  }

  // 1 + ln(count); most buckets are hit once or a few times, so small counts come from a table.
  static double count_value(std::size_t count) {
    static const auto table = [] {
      std::array<double, 64> values{};
      for (std::size_t c = 1; c < values.size(); ++c) values[c] = 1.0 + std::log(double(c));
      return values;
    }();
    return count < table.size() ? table[count] : 1.0 + std::log(double(count));
  }

  // Ascending order. A query has ~1,000 ids below 2^hash_bits: two LSD radix passes
  // of hash_bits/2 bits cost a fraction of std::sort's branchy comparisons (9 vs ~3
  // microseconds for a 300-character query); tiny inputs use std::sort.
  static void sort_buckets(std::vector<std::uint32_t>& buckets, int hash_bits) {
    if (buckets.size() < 128 || hash_bits > 24) {
      std::sort(buckets.begin(), buckets.end());
      return;
    }
    const int low_bits = (hash_bits + 1) / 2;
    const std::uint32_t radix = 1u << low_bits, mask = radix - 1;
    std::vector<std::uint32_t> scratch(buckets.size());
    std::vector<std::uint32_t> counts(radix);
    for (int pass = 0; pass < 2; ++pass) {
      const int shift = pass * low_bits;
      std::fill(counts.begin(), counts.end(), 0u);
      for (std::uint32_t id : buckets) ++counts[(id >> shift) & mask];
      std::uint32_t offset = 0;
      for (std::uint32_t& count : counts) offset += std::exchange(count, offset);
      for (std::uint32_t id : buckets) scratch[counts[(id >> shift) & mask]++] = id;
      buckets.swap(scratch);
    }
  }

 private:
  FeaturizerConfig config_;
};

}  // namespace meswitch
