// The router: documented hash values, the featurizer's rules, routing, the router
// file round trip and every way a router file can be wrong.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "meswitch/router.hpp"
#include "test_support.hpp"

using namespace meswitch;

namespace {

// A small router: 3 labels over 2^16 buckets; "math" reacts to the digit word "0",
// "code" to "def", "chat" to "hello".
RouterSpec toy_spec() {
  RouterSpec spec;
  spec.featurizer.hash_bits = 16;
  spec.labels = {"chat", "code", "math"};
  const std::size_t buckets = spec.featurizer.buckets();
  spec.weight.assign(3 * buckets, 0.0f);
  spec.bias = {0.0f, 0.0f, 0.0f};
  const auto word_bucket = [&](const std::string& word) {
    return std::size_t(hash64("w" + word) >> (64 - spec.featurizer.hash_bits));
  };
  spec.weight[0 * buckets + word_bucket("hello")] = 40.0f;
  spec.weight[1 * buckets + word_bucket("def")] = 40.0f;
  spec.weight[2 * buckets + word_bucket("0")] = 40.0f;
  spec.threshold = 0.6f;
  spec.fallback = "base";
  spec.training = {{"examples", 3}};
  return spec;
}

std::string router_dir(const std::string& name) {
  const std::string path = meswitch_test::scratch_path(name);
  detail::remove_tree(path);
  return path;
}

std::string read_all(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(stream), {});
}

void overwrite(const std::string& path, const std::string& bytes) { meswitch_test::write_bytes(path, bytes); }

}  // namespace

TEST_CASE("hash64 is FNV-1a 64 then fmix64, with documented values", "[router]") {
  // FNV-1a's published test vectors.
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  // The values docs/format.md lists (also checked from Python).
  CHECK(hash64("") == 0xefd01f60ba992926ull);
  CHECK(hash64("a") == 0x82a2a958a9bece5bull);
  CHECK(hash64("the") == 0xcb3ff435b889fb31ull);
  CHECK(hash64("wthe") == 0xf7b42bf7e916839dull);
  CHECK(hash64("cthe") == 0xafa7e16222de8b8bull);
  CHECK((hash64("wthe") >> (64 - 18)) == 253648u);
  // Continuing a state equals hashing the concatenation.
  CHECK(fnv1a64("he", 2, fnv1a64("t", 1)) == fnv1a64("the", 3));
}

TEST_CASE("normalize_text: case, digits, separators, invalid UTF-8, the input limit", "[router]") {
  CHECK(normalize_text("  Hello,\tWORLD 2024!\n", 100) == "hello, world 0000!");
  CHECK(normalize_text("", 100).empty());
  CHECK(normalize_text(std::string("\0\0 \x7f", 4), 100).empty());
  CHECK(normalize_text(std::string("a\0b", 3), 100) == "a b");            // NUL separates
  CHECK(normalize_text("\xc3\x89t\xc3\xa9", 100) == "\xc3\x89t\xc3\xa9");  // non-ASCII kept as is
  CHECK(normalize_text("a\xff" "b", 100) == "a\xef\xbf\xbd" "b");         // invalid byte -> U+FFFD
  CHECK(normalize_text("\xc0\xaf", 100) == "\xef\xbf\xbd\xef\xbf\xbd");  // overlong: each byte replaced
  CHECK(normalize_text("\xed\xa0\x80", 100) == "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // surrogate
  CHECK(normalize_text("\xf4\x90\x80\x80", 100).size() == 12);                          // > U+10FFFF
  CHECK(normalize_text("abc\xc3\xa9", 4) == "abc\xef\xbf\xbd");  // the limit cuts a sequence
  CHECK(normalize_text("abcdef", 3) == "abc");
}

TEST_CASE("Featurizer: n-gram counts, buckets, values and L2 norm", "[router]") {
  const Featurizer featurizer;  // defaults: 2^18, words 1-2, chars 3-5
  std::vector<std::uint32_t> buckets;
  featurizer.hashed_ngrams("ab cd", buckets);
  // words: ab, cd, "ab cd"; padded " ab cd " has 7 characters: 5 + 4 + 3 char n-grams.
  CHECK(buckets.size() == 3 + 12);
  CHECK(buckets[0] == std::uint32_t(hash64("wab") >> 46));
  CHECK(buckets[1] == std::uint32_t(hash64("wab cd") >> 46));
  CHECK(buckets[2] == std::uint32_t(hash64("wcd") >> 46));
  CHECK(buckets[3] == std::uint32_t(hash64("c ab") >> 46));

  const SparseFeatures features = featurizer.features("the the the cat");
  double norm = 0.0;
  for (std::size_t i = 0; i < features.index.size(); ++i) {
    if (i) CHECK(features.index[i - 1] < features.index[i]);
    norm += double(features.value[i]) * features.value[i];
  }
  CHECK(norm == Approx(1.0).epsilon(1e-6));
  // "the" occurs 3 times: 1 + ln 3 before normalisation; "cat" once: 1.
  const auto value_of = [&](const std::string& bytes) {
    const auto bucket = std::uint32_t(hash64(bytes) >> 46);
    for (std::size_t i = 0; i < features.index.size(); ++i)
      if (features.index[i] == bucket) return features.value[i];
    return -1.0f;
  };
  CHECK(value_of("wthe") / value_of("wcat") == Approx(1.0 + std::log(3.0)).epsilon(1e-5));

  CHECK(featurizer.features("").empty());
  CHECK(featurizer.features(" \t\n ").empty());
  CHECK(featurizer.features("Hello World") .index == featurizer.features("hello   world").index);
}

TEST_CASE("Featurizer: hostile inputs give defined features, never a crash", "[router]") {
  const Featurizer featurizer;
  std::mt19937 random(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::string bytes(std::size_t(random() % 600), '\0');
    for (char& c : bytes) c = char(random() & 0xff);
    const SparseFeatures features = featurizer.features(bytes);
    for (float value : features.value) REQUIRE(std::isfinite(value));
  }
  // 1 MB of text costs what the first max_input_bytes cost.
  const std::string huge(1 << 20, 'x');
  CHECK(featurizer.features(huge).index == featurizer.features(huge.substr(0, 16384)).index);
  const std::string nuls(1000, '\0');
  CHECK(featurizer.features(nuls).empty());
}

TEST_CASE("Router::route: argmax, threshold, fallback, empty text", "[router]") {
  const Router router(toy_spec());
  RouteResult result = router.route("def add(a, b): return a + b");
  CHECK(result.expert == "code");
  CHECK_FALSE(result.fallback);
  CHECK(result.label == 1);
  CHECK(result.confidence > 0.6f);
  CHECK(result.probabilities.size() == 3);
  double total = 0;
  for (float p : result.probabilities) total += p;
  CHECK(total == Approx(1.0));

  CHECK(router.route("hello there").expert == "chat");
  CHECK(router.route("what is 7 plus 3").expert == "math");  // digits fold to "0"

  result = router.route("nothing known here");  // all logits ~0: uniform, below the threshold
  CHECK(result.fallback);
  CHECK(result.expert == "base");
  CHECK(result.confidence == Approx(1.0 / 3).epsilon(1e-3));

  result = router.route("");
  CHECK(result.expert == "base");
  CHECK(result.fallback);
  CHECK(result.label == -1);
  CHECK(result.confidence == 0.0f);
  CHECK(result.probabilities == std::vector<float>{0, 0, 0});
}

TEST_CASE("Router::route is safe from many threads at once", "[router]") {
  const Router router(toy_spec());
  const RouteResult expected = router.route("def f(): pass");
  std::vector<std::thread> threads;
  std::vector<int> wrong(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i)
        if (router.route("def f(): pass").probabilities != expected.probabilities) ++wrong[t];
    });
  for (auto& thread : threads) thread.join();
  CHECK(wrong == std::vector<int>(4, 0));
}

TEST_CASE("Router files: write_router then load round-trips", "[router]") {
  const std::string dir = router_dir("router_roundtrip");
  const RouterSpec spec = toy_spec();
  write_router(dir, spec);
  const Router loaded = Router::load(dir);
  CHECK(loaded.labels() == spec.labels);
  CHECK(loaded.threshold() == spec.threshold);
  CHECK(loaded.fallback() == "base");
  CHECK(loaded.featurizer().config().hash_bits == 16);
  CHECK(loaded.training()["examples"] == 3);
  CHECK(loaded.class_major_weights() == spec.weight);
  CHECK(Router::load(dir + "/router.json").labels() == spec.labels);
  CHECK(loaded.route("def x").expert == "code");

  // Replacing needs `replace`; a directory that is not a router is never replaced.
  CHECK_THROWS_AS(write_router(dir, spec), OutputPathError);
  RouterSpec changed = spec;
  changed.threshold = 0.9f;
  write_router(dir, changed, true);
  CHECK(Router::load(dir).threshold() == 0.9f);
  const std::string other = router_dir("router_not_ours");
  ::mkdir(other.c_str(), 0755);
  meswitch_test::write_bytes(other + "/keep.txt", "x");
  CHECK_THROWS_AS(write_router(other, spec, true), OutputPathError);
  CHECK(meswitch_test::file_exists(other + "/keep.txt"));
}

TEST_CASE("Router files: labels must match the served experts", "[router]") {
  const std::string dir = router_dir("router_served");
  RouterSpec spec = toy_spec();
  spec.fallback = "chat";
  write_router(dir, spec);
  CHECK_NOTHROW(Router::load(dir, {"chat", "code", "math"}));
  try {
    Router::load(dir, {"chat"});
    FAIL("expected a FormatError");
  } catch (const FormatError& error) {
    const std::string message = error.what();
    CHECK(message.find("router.json") != std::string::npos);
    CHECK(message.find("not served: code, math") != std::string::npos);
  }
  CHECK(Router(spec).missing_experts({"code", "math"}) == std::vector<std::string>{"chat"});
  spec.fallback = "base";
  CHECK(Router(spec).missing_experts({"chat", "code", "math"}).empty());
}

TEST_CASE("Router files: bad and truncated files are FormatErrors naming the file", "[router]") {
  const std::string dir = router_dir("router_bad");
  write_router(dir, toy_spec());
  const std::string manifest_path = dir + "/router.json";
  const std::string weights_path = dir + "/weights.safetensors";
  const std::string manifest = read_all(manifest_path);
  const std::string weights = read_all(weights_path);

  const auto fails_with = [&](const std::string& file, const std::string& problem) {
    try {
      Router::load(dir);
    } catch (const FormatError& error) {
      CHECK(error.file() == file);
      CHECK(std::string(error.what()).find(problem) != std::string::npos);
      return;
    }
    FAIL("no FormatError for: " + problem);
  };
  const auto with_manifest = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& problem,
                                  const std::string* file = nullptr) {
    nlohmann::json json = nlohmann::json::parse(manifest);
    edit(json);
    overwrite(manifest_path, json.dump());
    fails_with(file ? *file : manifest_path, problem);
  };

  overwrite(manifest_path, manifest.substr(0, manifest.size() / 2));
  fails_with(manifest_path, "not valid JSON");
  overwrite(manifest_path, "[]");
  fails_with(manifest_path, "not a JSON object");
  with_manifest([](auto& j) { j["format"] = "meswitch-expert"; }, "not a router");
  with_manifest([](auto& j) { j["format_version"] = 2; }, "'format_version' is 2");
  with_manifest([](auto& j) { j.erase("labels"); }, "'labels'");
  with_manifest([](auto& j) { j["labels"] = {"chat", "chat", "math"}; }, "twice");
  with_manifest([](auto& j) { j["labels"] = {"chat", "a b", "math"}; }, "not an expert name");
  with_manifest([](auto& j) { j["labels"] = {"chat", "code"}; }, "shape [3, 65536], expected [2, 65536]",
                &weights_path);
  with_manifest([](auto& j) { j["featurizer"]["hash_bits"] = 40; }, "'featurizer.hash_bits' is 40");
  with_manifest([](auto& j) { j["featurizer"]["hash_bits"] = 12; }, "expected [3, 4096]", &weights_path);
  with_manifest([](auto& j) { j["featurizer"]["char_ngram_min"] = 6; }, "char n-gram range 6..5");
  with_manifest([](auto& j) { j["featurizer"]["name"] = "other"; }, "'featurizer.name'");
  with_manifest([](auto& j) { j["threshold"] = 1.5; }, "'threshold'");
  with_manifest([](auto& j) { j["threshold"] = "high"; }, "'threshold'");
  with_manifest([](auto& j) { j["fallback"] = ""; }, "'fallback'");
  with_manifest([](auto& j) { j["weights"] = "../elsewhere.safetensors"; }, "'weights'");
  with_manifest([](auto& j) { j["training"] = 3; }, "'training' is not an object");
  overwrite(manifest_path, manifest);

  overwrite(weights_path, weights.substr(0, weights.size() - 100));
  fails_with(weights_path, "");
  overwrite(weights_path, weights.substr(0, 4));
  fails_with(weights_path, "");
  ::unlink(weights_path.c_str());
  fails_with(weights_path, "");

  RouterSpec spec = toy_spec();
  spec.bias[1] = std::nanf("");
  write_router(dir, spec, true);
  fails_with(weights_path, "NaN");

  ::unlink(manifest_path.c_str());
  CHECK_THROWS_AS(Router::load(dir), FormatError);
  CHECK_THROWS_AS(Router::load(dir + "/missing"), FormatError);
}

TEST_CASE("Featurizer::sort_buckets (radix) agrees with std::sort", "[router]") {
  std::mt19937 random(11);
  for (int bits : {8, 9, 18, 24}) {
    for (std::size_t size : {0, 5, 127, 128, 1000, 5000}) {
      std::vector<std::uint32_t> ids(size);
      for (auto& id : ids) id = std::uint32_t(random()) >> (32 - bits);
      std::vector<std::uint32_t> expected = ids;
      std::sort(expected.begin(), expected.end());
      Featurizer::sort_buckets(ids, bits);
      REQUIRE(ids == expected);
    }
  }
}
