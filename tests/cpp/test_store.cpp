#include <catch2/catch.hpp>
#include <atomic>
#include <chrono>
#include <mutex>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "meswitch/artifact.hpp"
#include "meswitch/store.hpp"
#include "test_support.hpp"

using namespace meswitch;
using Catch::Matchers::Contains;
using meswitch_test::scratch_path;
using meswitch_test::write_bytes;

namespace {

const char* const kConfig = "{\"model_type\": \"llama\"}";

// A base with the one tensor the experts below take a delta of: w, F16 [2, 8].
std::string write_base(const std::string& name, std::uint16_t w_bits = 0x3c00) {
  const std::string directory = scratch_path(name);
  ::mkdir(directory.c_str(), 0755);
  std::vector<std::uint16_t> w(16, w_bits);
  write_safetensors(directory + "/model.safetensors", {{{"w", DType::F16, {2, 8}}, w.data()}});
  write_bytes(directory + "/config.json", kConfig);
  return directory;
}

nlohmann::json fingerprint_of(const std::string& base) {
  return base_fingerprint(SafetensorsCheckpoint::open(base), kConfig);
}

// An expert of `base` named `name`: a 2-bit delta of w plus `pad_floats` float32 of a
// whole tensor, which sets its size.
std::string write_expert(const std::string& name, const nlohmann::json& fingerprint, std::int64_t pad_floats) {
  const std::string directory = scratch_path(name + ".meswitch");
  ArtifactWriter writer(directory);
  std::vector<std::uint32_t> qweight(2, 0xAAAAAAAAu);
  std::vector<std::uint16_t> scales(2, 0x3c00), salient(2, 0x4000);
  std::vector<std::uint8_t> zeros(2, 1);
  std::vector<std::int32_t> salient_idx = {3};
  std::vector<float> pad(std::size_t(pad_floats), 0.5f);
  writer.add_tensor("w.qweight", DType::U32, {2, 1}, qweight.data());
  writer.add_tensor("w.scales", DType::F16, {2, 1}, scales.data());
  writer.add_tensor("w.zeros", DType::U8, {2, 1}, zeros.data());
  writer.add_tensor("w.salient_idx", DType::I32, {1}, salient_idx.data());
  writer.add_tensor("w.salient", DType::F16, {2, 1}, salient.data());
  writer.add_tensor("pad.full", DType::F32, {pad_floats}, pad.data());
  writer.add_file_content("expert/config.json", kConfig);
  writer.commit({{"name", name},
                 {"base", fingerprint},
                 {"expert_config", {{"model_type", "llama"}}},
                 {"quantization",
                  {{"bits", 2}, {"group_size", 8}, {"salient", 1}, {"clip_grid", 1}, {"min_clip", 0.5},
                   {"avg_bits", nullptr}, {"vocab_bits", nullptr}, {"calibration", {{"kind", "weight-only"}}}}},
                 {"statistics", {{"delta_parameters", 16}, {"delta_storage_bits", 112}, {"avg_bits", 7.0}}},
                 {"tensors",
                  {{"w", {{"kind", "delta"}, {"dtype", "F16"}, {"shape", {2, 8}}, {"rows", 2}, {"cols", 8},
                          {"bits", 2}, {"group_size", 8}, {"salient", 1}}},
                   {"pad", {{"kind", "full"}, {"dtype", "F32"}, {"shape", {pad_floats}}}}}}});
  return directory;
}

const StoreExpertReport& expert_in(const StoreReport& report, const std::string& name) {
  for (const StoreExpertReport& expert : report.experts)
    if (expert.name == name) return expert;
  FAIL("no expert " << name << " in the report");
  return report.experts.front();
}

// What is wrong with the accounting ("" when nothing): the host tier never passes its
// budget, and its bytes are exactly those of the experts resident or loading on it.
// (A plain function: Catch2's assertions must not run on the churn test's threads.)
std::string accounting_problem(const StoreReport& report) {
  if (report.tiers.size() != 2 || report.tiers[1].tier != "host") return "no host tier report";
  const StoreTierReport& host = report.tiers[1];
  if (host.used_bytes > host.budget_bytes)
    return std::to_string(host.used_bytes) + " bytes used, over the budget of " + std::to_string(host.budget_bytes);
  std::uint64_t counted = 0;
  std::size_t resident = 0, loading = 0;
  for (const StoreExpertReport& expert : report.experts) {
    if (expert.tier == "host") ++resident;
    if (expert.tier == "loading") ++loading;
    if (expert.tier != "disk") counted += expert.bytes;
    if (expert.holders > 0 && expert.tier != "host") return expert.name + " is held but not resident";
  }
  if (counted != host.used_bytes)
    return "experts on the host tier add up to " + std::to_string(counted) + " bytes, the tier says " +
           std::to_string(host.used_bytes);
  if (resident != host.entries || loading != host.loading) return "entry counts disagree";
  return "";
}

void check_accounting(const StoreReport& report) { REQUIRE(accounting_problem(report) == ""); }

struct Family {
  std::string base;
  std::vector<std::string> experts;  // directories
  std::uint64_t bytes = 0;           // host bytes of each (all the same size)
};

Family family_of(const std::string& tag, int count, std::int64_t pad_floats = 3000) {
  Family family;
  family.base = write_base(tag + "_base");
  const nlohmann::json fingerprint = fingerprint_of(family.base);
  for (int i = 0; i < count; ++i)
    family.experts.push_back(write_expert(tag + "_e" + std::to_string(i), fingerprint, pad_floats));
  ExpertStore probe(family.base, kConfig, 1ull << 30);
  probe.add(family.experts[0]);
  family.bytes = probe.memory_report().experts[0].bytes;
  return family;
}

}  // namespace

TEST_CASE("the store counts whole pages of shard bytes and evicts the least recently used", "[store]") {
  const Family family = family_of("lru", 3);
  const std::uint64_t page = std::uint64_t(::sysconf(_SC_PAGESIZE));
  REQUIRE(family.bytes % page == 0);
  REQUIRE(family.bytes >= 3000 * 4);
  ExpertStore store(family.base, kConfig, 2 * family.bytes);
  for (const std::string& directory : family.experts) store.add(directory);
  REQUIRE(store.names() == std::vector<std::string>{"lru_e0", "lru_e1", "lru_e2"});
  store.acquire("lru_e0");
  store.acquire("lru_e1");
  store.acquire("lru_e0");  // now e1 is the least recently used
  check_accounting(store.memory_report());
  {
    const ExpertStore::Handle handle = store.acquire("lru_e2");
    REQUIRE(handle.name() == "lru_e2");
    REQUIRE(handle.artifact().kind("pad") == "full");
  }
  const StoreReport report = store.memory_report();
  check_accounting(report);
  REQUIRE(expert_in(report, "lru_e0").tier == "host");
  REQUIRE(expert_in(report, "lru_e1").tier == "disk");
  REQUIRE(expert_in(report, "lru_e2").tier == "host");
  REQUIRE(report.tiers[1].used_bytes == 2 * family.bytes);
  REQUIRE(report.tiers[0].used_bytes == 3 * family.bytes);
  REQUIRE(report.tiers[0].entries == 3);
  REQUIRE(report.hits == 1);
  REQUIRE(report.misses == 3);
  REQUIRE(report.loads == 3);
  REQUIRE(report.evictions == 1);
  REQUIRE(report.load_seconds > 0);
}

TEST_CASE("each expert counts its own loads and the acquires that waited for them", "[store]") {
  const Family family = family_of("per_expert", 2);
  ExpertStore store(family.base, kConfig, family.bytes);  // room for one: each acquire of the other evicts
  for (const std::string& directory : family.experts) store.add(directory);
  store.acquire("per_expert_e0");  // miss: loads e0
  store.acquire("per_expert_e0");  // hit
  store.acquire("per_expert_e1");  // miss: evicts e0, loads e1
  store.acquire("per_expert_e0");  // miss: evicts e1, loads e0 again
  const StoreReport report = store.memory_report();
  const StoreExpertReport& e0 = expert_in(report, "per_expert_e0");
  const StoreExpertReport& e1 = expert_in(report, "per_expert_e1");
  REQUIRE(e0.loads == 2);
  REQUIRE(e1.loads == 1);
  REQUIRE(e0.waited_acquires == 2);  // the hit did not wait
  REQUIRE(e1.waited_acquires == 1);
  REQUIRE(e0.load_seconds > 0);
  REQUIRE(e0.wait_seconds >= e0.load_seconds);  // an acquire that loads waits for the whole load
  REQUIRE(e1.wait_seconds >= e1.load_seconds);
  REQUIRE(e0.loads + e1.loads == report.loads);
  REQUIRE(e0.load_seconds + e1.load_seconds == Approx(report.load_seconds));
}

TEST_CASE("a batch lease holds every expert of a batch, or none of them", "[store]") {
  const Family family = family_of("lease", 3);
  ExpertStore store(family.base, kConfig, 2 * family.bytes);
  for (const std::string& directory : family.experts) store.add(directory);
  {
    ExpertStore::BatchLease lease = store.acquire_batch({"lease_e1", "lease_e0", "lease_e1"});
    REQUIRE(lease.names() == std::vector<std::string>{"lease_e0", "lease_e1"});  // a repeat is one hold
    REQUIRE(lease["lease_e0"].artifact().kind("pad") == "full");
    REQUIRE_THROWS_WITH(lease["lease_e2"], Catch::Contains("holds no expert named 'lease_e2'"));
    const StoreReport report = store.memory_report();
    REQUIRE(expert_in(report, "lease_e0").holders == 1);
    REQUIRE(expert_in(report, "lease_e1").holders == 1);
    // Both held: a third does not fit, and the batch that asks for it holds nothing afterwards.
    REQUIRE_THROWS_WITH(store.acquire_batch({"lease_e2"}), Catch::Contains("cannot load expert 'lease_e2'"));
    REQUIRE_THROWS_AS(store.acquire_batch({"lease_e2"}), TierFull);  // may fit once a hold ends
  }
  REQUIRE(expert_in(store.memory_report(), "lease_e0").holders == 0);
  const ExpertStore::Handle held = store.acquire("lease_e0");
  // e0 is held apart from the batch: e1 fits beside it, e2 then cannot (e1 is held by the batch
  // so far): the whole batch fails and lets e1 go.
  REQUIRE_THROWS_WITH(store.acquire_batch({"lease_e1", "lease_e2"}), Catch::Contains("cannot load expert 'lease_e2'"));
  const StoreReport after = store.memory_report();
  REQUIRE(expert_in(after, "lease_e1").holders == 0);
  REQUIRE(expert_in(after, "lease_e0").holders == 1);
  check_accounting(after);
}

TEST_CASE("remove drains a held expert: new acquires are refused and it goes with the last hold", "[store]") {
  static const Family family = family_of("drain", 2);  // once: each SECTION runs the case again
  ExpertStore store(family.base, kConfig, 4 * family.bytes);
  for (const std::string& directory : family.experts) store.add(directory);
  SECTION("the hold ends within the time: the expert is removed") {
    ExpertStore::Handle held = store.acquire("drain_e0");
    std::thread remover([&] { store.remove("drain_e0", std::chrono::milliseconds(20000)); });
    // Wait until the removal is draining: a new acquire is refused, naming why.
    bool refused = false;
    for (int i = 0; i < 2000 && !refused; ++i) {
      try {
        store.acquire("drain_e0");
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      } catch (const Error& error) {
        refused = std::string(error.what()).find("is being removed") != std::string::npos;
        REQUIRE(refused);
      }
    }
    REQUIRE(refused);
    store.acquire("drain_e1");  // another expert is served meanwhile
    held.release();
    remover.join();
    REQUIRE(store.names() == std::vector<std::string>{"drain_e1"});
  }
  SECTION("the hold outlasts the time: refused, naming the holders, and served again") {
    const ExpertStore::Handle held = store.acquire("drain_e0");
    REQUIRE_THROWS_WITH(store.remove("drain_e0", std::chrono::milliseconds(50)),
                        Catch::Contains("1 handle(s) hold it") && Catch::Contains("after waiting 50 ms"));
    REQUIRE(store.acquire("drain_e0"));
    REQUIRE(store.names().size() == 2);
  }
}

TEST_CASE("a claimed expert is not removed; claims hold no memory and are refused while it drains", "[store]") {
  const Family family = family_of("claim", 2);
  ExpertStore store(family.base, kConfig, family.bytes);  // room for one expert
  for (const std::string& directory : family.experts) store.add(directory);
  ExpertStore::Claim claim = store.claim("claim_e0");
  REQUIRE(claim);
  REQUIRE(expert_in(store.memory_report(), "claim_e0").claims == 1);
  REQUIRE(store.tier("claim_e0") == StoreTier::Disk);  // a claim loads nothing
  // Claimed but not held: evicted like any idle expert when another needs the room.
  store.acquire("claim_e0").release();
  store.acquire("claim_e1").release();
  REQUIRE(store.tier("claim_e0") == StoreTier::Disk);
  // Refused at once, even with time to drain: requests may run for minutes.
  REQUIRE_THROWS_WITH(store.remove("claim_e0", std::chrono::milliseconds(20000)),
                      Catch::Contains("1 request(s) use it"));
  ExpertStore::Claim moved = std::move(claim);
  REQUIRE_FALSE(claim);
  moved.release();
  moved.release();  // idempotent
  REQUIRE(expert_in(store.memory_report(), "claim_e0").claims == 0);
  // Held (an engine letting go after its last request): draining refuses new claims.
  ExpertStore::Handle held = store.acquire("claim_e1");
  std::thread remover([&] { store.remove("claim_e1", std::chrono::milliseconds(20000)); });
  bool refused = false;
  for (int i = 0; i < 2000 && !refused; ++i) {
    try {
      store.claim("claim_e1");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    } catch (const Error& error) {
      refused = std::string(error.what()).find("is being removed") != std::string::npos;
      REQUIRE(refused);
    }
  }
  REQUIRE(refused);
  held.release();
  remover.join();
  store.remove("claim_e0");
  REQUIRE(store.names().empty());
  REQUIRE_THROWS_WITH(store.claim("claim_e0"), Catch::Contains("no expert named 'claim_e0'"));
}

TEST_CASE("acquire_if_resident holds a resident expert and neither loads nor waits for one that is not", "[store]") {
  const Family family = family_of("ifres", 2);
  ExpertStore store(family.base, kConfig, 2 * family.bytes);
  for (const std::string& directory : family.experts) store.add(directory);
  const StoreReport before = store.memory_report();
  REQUIRE_FALSE(store.acquire_if_resident("ifres_e0"));
  const StoreReport unchanged = store.memory_report();
  REQUIRE(unchanged.misses == before.misses);
  REQUIRE(unchanged.loads == before.loads);
  REQUIRE(store.tier("ifres_e0") == StoreTier::Disk);
  store.acquire("ifres_e0").release();
  {
    const ExpertStore::Handle held = store.acquire_if_resident("ifres_e0");
    REQUIRE(held);
    REQUIRE(held.artifact().kind("pad") == "full");
    REQUIRE(expert_in(store.memory_report(), "ifres_e0").holders == 1);
  }
  REQUIRE(expert_in(store.memory_report(), "ifres_e0").holders == 0);
  REQUIRE_THROWS_WITH(store.acquire_if_resident("nobody"), Catch::Contains("no expert named 'nobody'"));
  check_accounting(store.memory_report());
}

TEST_CASE("held and pinned experts are never evicted; a full tier refuses the load", "[store]") {
  const Family family = family_of("held", 3);
  ExpertStore store(family.base, kConfig, 2 * family.bytes);
  for (const std::string& directory : family.experts) store.add(directory);
  ExpertStore::Handle first = store.acquire("held_e0");
  ExpertStore::Handle second = store.acquire("held_e1");
  REQUIRE_THROWS_WITH(store.acquire("held_e2"),
                      Contains("cannot load expert 'held_e2'") && Contains("held_e0 (") && Contains("held)"));
  store.prefetch("held_e2");  // a hint: skipped when the thread finds no room
  store.wait("held_e2");
  const StoreReport full = store.memory_report();
  check_accounting(full);
  REQUIRE(full.prefetches_skipped == 1);
  REQUIRE(expert_in(full, "held_e2").tier == "disk");
  REQUIRE(full.evictions == 0);  // a refused load evicts nothing

  second.release();
  REQUIRE_THROWS_WITH(second.artifact(), Contains("released"));
  store.acquire("held_e2");  // evicts e1, the only expert nobody holds
  REQUIRE(expert_in(store.memory_report(), "held_e0").tier == "host");
  REQUIRE(expert_in(store.memory_report(), "held_e1").tier == "disk");

  store.pin("held_e0");
  first.release();
  store.acquire("held_e1");  // e0 is pinned: e2 goes
  StoreReport report = store.memory_report();
  check_accounting(report);
  REQUIRE(expert_in(report, "held_e0").tier == "host");
  REQUIRE(expert_in(report, "held_e0").pinned);
  REQUIRE(expert_in(report, "held_e2").tier == "disk");
  store.unpin("held_e0");
  store.acquire("held_e2");  // e0 is the least recently used now and no longer pinned
  report = store.memory_report();
  REQUIRE(expert_in(report, "held_e0").tier == "disk");
  REQUIRE(expert_in(report, "held_e1").tier == "host");
}

TEST_CASE("an expert larger than the host budget is refused, naming its bytes and the budget", "[store]") {
  const Family family = family_of("large", 1);
  ExpertStore store(family.base, kConfig, family.bytes - 1);
  store.add(family.experts[0]);
  const std::string message = "expert 'large_e0' needs " + std::to_string(family.bytes) +
                              " bytes of host memory, more than the host tier's whole budget of " +
                              std::to_string(family.bytes - 1) + " bytes";
  REQUIRE_THROWS_WITH(store.acquire("large_e0"), Contains(message));
  REQUIRE_THROWS_WITH(store.prefetch("large_e0"), Contains(message));
  REQUIRE_THROWS_WITH(store.pin("large_e0"), Contains(message));
  REQUIRE(store.memory_report().tiers[1].used_bytes == 0);
  REQUIRE_THROWS_WITH(ExpertStore(family.base, kConfig, 0), Contains("positive"));
}

TEST_CASE("an expert of another base is refused at add, naming the first differing tensor", "[store]") {
  const std::string base = write_base("wrong_base");
  const std::string other = write_base("wrong_other", 0x4000);
  const std::string expert = write_expert("wrong_e0", fingerprint_of(other), 100);
  ExpertStore store(base, kConfig, 1 << 20);
  REQUIRE_THROWS_AS(store.add(expert), FormatError);
  REQUIRE_THROWS_WITH(store.add(expert), Contains("different base model") && Contains("tensor 'w' differs"));
  REQUIRE(store.names().empty());
}

TEST_CASE("prefetch loads in the background; its error reaches acquire and wait", "[store]") {
  const Family family = family_of("prefetch", 2);
  ExpertStore store(family.base, kConfig, 4 * family.bytes);
  store.add(family.experts[0]);
  store.add(family.experts[1]);
  store.prefetch("prefetch_e0");
  store.wait("prefetch_e0");
  REQUIRE(expert_in(store.memory_report(), "prefetch_e0").tier == "host");
  store.acquire("prefetch_e0");
  REQUIRE(store.memory_report().hits == 1);

  // Corrupt one byte of e1's shard after add: the checksum, verified at load, fails.
  const std::string shard = family.experts[1] + "/deltas-00001-of-00001.safetensors";
  {
    std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(-4, std::ios::end);
    file.put('\x7f');
  }
  store.prefetch("prefetch_e1");
  REQUIRE_THROWS_WITH(store.acquire("prefetch_e1"), Contains(shard) && Contains("does not match the manifest"));
  StoreReport report = store.memory_report();
  check_accounting(report);
  REQUIRE(report.load_failures == 1);
  REQUIRE(expert_in(report, "prefetch_e1").tier == "disk");

  store.prefetch("prefetch_e1");
  REQUIRE_THROWS_WITH(store.wait("prefetch_e1"), Contains("does not match the manifest"));
  REQUIRE_NOTHROW(store.wait("prefetch_e1"));  // reported once
  REQUIRE_THROWS_WITH(store.acquire("prefetch_e1"), Contains("does not match the manifest"));  // loads again
  report = store.memory_report();
  REQUIRE(report.load_failures == 3);
  REQUIRE(report.tiers[1].used_bytes == family.bytes);
}

TEST_CASE("add and remove at any time; a held or duplicate expert is refused", "[store]") {
  const Family family = family_of("remove", 2);
  ExpertStore store(family.base, kConfig, 4 * family.bytes);
  REQUIRE(store.add(family.experts[0]) == "remove_e0");
  REQUIRE_THROWS_WITH(store.add(family.experts[0]), Contains("already has an expert named 'remove_e0'"));
  {
    ExpertStore::Handle handle = store.acquire("remove_e0");
    REQUIRE_THROWS_WITH(store.remove("remove_e0"), Contains("cannot remove expert 'remove_e0': 1 handle(s) hold it"));
    store.add(family.experts[1]);  // while another is held
    REQUIRE(store.names().size() == 2);
  }
  store.pin("remove_e1");
  store.remove("remove_e0");
  store.remove("remove_e1");  // pinned but not held
  REQUIRE(store.names().empty());
  REQUIRE(store.memory_report().tiers[1].used_bytes == 0);
  REQUIRE_THROWS_WITH(store.acquire("remove_e0"), Contains("no expert named 'remove_e0'"));
  store.add(family.experts[0]);
  REQUIRE(store.acquire("remove_e0").artifact().manifest()["name"] == "remove_e0");
}

TEST_CASE("a handle outlives its store", "[store]") {
  const Family family = family_of("outlive", 1);
  ExpertStore::Handle handle;
  {
    ExpertStore store(family.base, kConfig, 2 * family.bytes);
    store.add(family.experts[0]);
    handle = store.acquire("outlive_e0");
    store.prefetch("outlive_e0");  // resident: nothing to do
  }
  REQUIRE(handle.artifact().stored("pad.full").shape == Shape{3000});
}

TEST_CASE("a held expert hands out its tensors: deltas, whole tensors and the embedding lookup rule", "[store]") {
  const Family family = family_of("tensors", 1, 5);
  ExpertStore store(family.base, kConfig, 2 * family.bytes);
  store.add(family.experts[0]);
  const ExpertStore::Handle handle = store.acquire("tensors_e0");
  const ExpertTensors& tensors = handle.tensors();
  REQUIRE(tensors.name() == "tensors_e0");
  REQUIRE(tensors.deltas().size() == 1);
  REQUIRE(tensors.delta("w") != nullptr);
  REQUIRE(tensors.delta("w")->bits == 2);
  REQUIRE(tensors.whole("pad") != nullptr);
  REQUIRE(tensors.whole("pad")->shape == Shape{5});
  REQUIRE(tensors.extra_rows().empty());
  REQUIRE(tensors.rows("w", 2) == 2);
  REQUIRE(tensors.rows("pad", 2) == 5);
  // w: base 1.0 (f16) everywhere; each code 2 - zero 1 = 1.0, column 3 salient + 2.0.
  std::vector<std::uint16_t> table(16, 0x3c00);
  const TensorView base(table.data(), DType::F16, {2, 8});
  const std::vector<std::int64_t> ids = {1, 0};
  std::vector<float> out(16, -1.0f);
  tensors.lookup("w", base, ids.data(), 2, out.data());
  for (std::size_t i = 0; i < 16; ++i) REQUIRE(out[i] == (i % 8 == 3 ? 4.0f : 2.0f));
  const std::vector<std::int64_t> bad = {0, 2};
  std::fill(out.begin(), out.end(), -1.0f);
  REQUIRE_THROWS_WITH(tensors.lookup("w", base, bad.data(), 2, out.data()),
                      "token id 2 is outside the vocabulary of tensors_e0 (2 tokens)");
  REQUIRE(out[0] == -1.0f);  // refused before anything was written
}

TEST_CASE("churn: threads acquire and release many experts within a budget smaller than their sum", "[store]") {
  const std::string base = write_base("churn_base");
  const nlohmann::json fingerprint = fingerprint_of(base);
  std::vector<std::string> names;
  std::vector<std::string> directories;
  for (int i = 0; i < 8; ++i) {
    names.push_back("churn_e" + std::to_string(i));
    directories.push_back(write_expert(names.back(), fingerprint, 5000 + 400 * i));  // different sizes
  }
  std::uint64_t largest = 0, total = 0;
  {
    ExpertStore probe(base, kConfig, 1ull << 30);
    for (const std::string& directory : directories) probe.add(directory);
    for (const StoreExpertReport& expert : probe.memory_report().experts) {
      largest = std::max(largest, expert.bytes);
      total += expert.bytes;
    }
  }
  // Three acquiring threads hold one expert each at most and one prefetch may be in
  // flight: four of the largest always fit, all eight never do.
  const std::uint64_t budget = 4 * largest;
  REQUIRE(budget < total);
  ExpertStore store(base, kConfig, budget);
  for (const std::string& directory : directories) store.add(directory);

  constexpr int kThreads = 3, kSteps = 150;
  std::atomic<int> acquires{0}, full{0}, checks{0};
  std::mutex problem_mutex;
  std::string problem;  // the first thing a thread found wrong
  const auto record = [&](const std::string& found) {
    if (found.empty()) return;
    std::lock_guard<std::mutex> lock(problem_mutex);
    if (problem.empty()) problem = found;
  };
  const auto failed = [&] {
    std::lock_guard<std::mutex> lock(problem_mutex);
    return !problem.empty();
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 random(t + 1);
      for (int step = 0; step < kSteps && !failed(); ++step) {
        const std::size_t index = random() % names.size();
        try {
          ExpertStore::Handle handle = store.acquire(names[index]);
          ++acquires;
          record(accounting_problem(store.memory_report()));
          if (handle.artifact().manifest()["name"] != names[index]) record("acquire gave another expert");
          if (handle.artifact().stored("pad.full").shape[0] != 5000 + 400 * std::int64_t(index))
            record("the resident shard of " + names[index] + " has the wrong tensor");
        } catch (const TierFull& error) {  // no room beside the other threads' holds
          if (std::string(error.what()).find("held, pinned or loading") != std::string::npos) ++full;
          else record(error.what());
        } catch (const Error& error) {
          record(error.what());
        }
        record(accounting_problem(store.memory_report()));  // after the release
        ++checks;
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937 random(99);
    for (int step = 0; step < kSteps && !failed(); ++step) {
      try {
        store.prefetch(names[random() % names.size()]);
      } catch (const Error& error) {
        record(error.what());
      }
      record(accounting_problem(store.memory_report()));
      std::this_thread::yield();
    }
  });
  for (std::thread& thread : threads) thread.join();
  INFO(problem);
  REQUIRE(problem.empty());
  REQUIRE(checks == kThreads * kSteps);
  REQUIRE(full == 0);
  for (const std::string& name : names) store.wait(name);
  const StoreReport report = store.memory_report();
  check_accounting(report);
  REQUIRE(report.hits + report.misses == std::uint64_t(acquires));
  REQUIRE(acquires == kThreads * kSteps);
  REQUIRE(report.evictions > 0);
  REQUIRE(report.load_failures == 0);
  for (const StoreExpertReport& expert : report.experts) REQUIRE(expert.holders == 0);
}

TEST_CASE("a reload after eviction hashes the shards again only when their files changed", "[store]") {
  const Family family = family_of("reload", 2);
  ExpertStore store(family.base, kConfig, family.bytes);  // room for one
  store.add(family.experts[0]);
  store.add(family.experts[1]);
  store.acquire("reload_e0");
  store.acquire("reload_e1");
  store.acquire("reload_e0");  // its files are unchanged: no hashing
  StoreReport report = store.memory_report();
  REQUIRE(report.loads == 3);
  REQUIRE(report.verified_loads == 2);
  REQUIRE(report.evictions == 2);

  store.acquire("reload_e1");  // evicts e0, whose shard is then altered in place
  const std::string shard = family.experts[0] + "/deltas-00001-of-00001.safetensors";
  {
    std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(-4, std::ios::end);
    file.put('\x7f');
  }
  REQUIRE_THROWS_WITH(store.acquire("reload_e0"), Contains(shard) && Contains("does not match the manifest"));
  report = store.memory_report();
  REQUIRE(report.load_failures == 1);
  check_accounting(report);
}

namespace {

// The float32 values of `pad.full` in the expert the handle holds.
std::vector<float> pad_of(const ExpertArtifact& artifact) {
  const TensorView view = artifact.stored("pad.full");
  const float* values = view.data_as<const float>();
  return std::vector<float>(values, values + view.shape[0]);
}

std::string copy_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Replaces `path` with a new file (another inode) holding `bytes`, as a rewrite by rename does.
void replace_file(const std::string& path, const std::string& bytes) {
  write_bytes(path + ".new", bytes);
  REQUIRE(::rename((path + ".new").c_str(), path.c_str()) == 0);
}

}  // namespace

TEST_CASE("a reload of unchanged files shares the first load's record and recycles the evicted buffers", "[store]") {
  const Family family = family_of("recycle", 2);
  ExpertStore store(family.base, kConfig, family.bytes);  // room for one
  store.add(family.experts[0]);
  store.add(family.experts[1]);
  std::shared_ptr<const ArtifactRecord> first;
  {
    ExpertStore::Handle held = store.acquire("recycle_e0");
    first = held.artifact().record();
    REQUIRE(first->checksums_verified);
    REQUIRE(held.artifact().recycled_buffers() == 0);  // nothing was evicted for it
  }
  store.acquire("recycle_e1");  // a first load, into the pages of e0, which nobody holds
  StoreReport report = store.memory_report();
  REQUIRE(report.recycled_buffers == 1);
  REQUIRE(report.verified_loads == 2);
  {
    ExpertStore::Handle again = store.acquire("recycle_e0");
    REQUIRE(again.artifact().record() == first);  // nothing parsed or checked again
    REQUIRE(again.artifact().recycled_buffers() == 1);
    REQUIRE(pad_of(again.artifact()) == std::vector<float>(3000, 0.5f));
    REQUIRE(again.artifact().delta("w").salient_idx[0] == 3);
  }
  report = store.memory_report();
  REQUIRE(report.loads == 3);
  REQUIRE(report.verified_loads == 2);
  REQUIRE(report.recycled_buffers == 2);

  // An artifact still referenced after its release (a view someone kept) is evicted from
  // the budget but its bytes are not reused: they stay as they were.
  std::shared_ptr<const ExpertArtifact> kept = store.acquire("recycle_e0").shared_artifact();
  store.acquire("recycle_e1");
  REQUIRE(store.memory_report().recycled_buffers == 2);
  REQUIRE(pad_of(*kept) == std::vector<float>(3000, 0.5f));
  check_accounting(store.memory_report());
}

TEST_CASE("a reload verifies everything again when any file changed after eviction", "[store]") {
  // Each section changes one file of e0 while it is evicted, then loads it again.
  const auto evicted_family = [](const std::string& tag) {
    Family family = family_of(tag, 2);
    auto store = std::make_unique<ExpertStore>(family.base, kConfig, family.bytes);
    store->add(family.experts[0]);
    store->add(family.experts[1]);
    store->acquire(tag + "_e0");
    store->acquire(tag + "_e1");
    return std::make_pair(std::move(family), std::move(store));
  };
  SECTION("a shard rewritten with the same bytes: verified again, then reused") {
    auto [family, store] = evicted_family("same_bytes");
    const std::string shard = family.experts[0] + "/deltas-00001-of-00001.safetensors";
    replace_file(shard, copy_of(shard));
    REQUIRE(pad_of(store->acquire("same_bytes_e0").artifact()) == std::vector<float>(3000, 0.5f));
    REQUIRE(store->memory_report().verified_loads == 3);
  }
  SECTION("a shard replaced by one with an altered byte: the checksum catches it") {
    auto [family, store] = evicted_family("altered");
    const std::string shard = family.experts[0] + "/deltas-00001-of-00001.safetensors";
    std::string bytes = copy_of(shard);
    bytes[bytes.size() - 5] ^= 0x01;
    replace_file(shard, bytes);
    REQUIRE_THROWS_WITH(store->acquire("altered_e0"), Contains(shard) && Contains("does not match the manifest"));
    check_accounting(store->memory_report());
  }
  SECTION("a shard replaced by a link to an identical copy is refused as a link") {
    auto [family, store] = evicted_family("linked");
    const std::string shard = family.experts[0] + "/deltas-00001-of-00001.safetensors";
    write_bytes(shard + ".elsewhere", copy_of(shard));
    REQUIRE(::unlink(shard.c_str()) == 0);
    REQUIRE(::symlink((shard + ".elsewhere").c_str(), shard.c_str()) == 0);
    REQUIRE_THROWS_WITH(store->acquire("linked_e0"), Contains(shard) && Contains("symbolic link"));
  }
  SECTION("the manifest rewritten: parsed and verified again") {
    auto [family, store] = evicted_family("manifest");
    const std::string manifest = family.experts[0] + "/manifest.json";
    replace_file(manifest, copy_of(manifest));
    store->acquire("manifest_e0");
    REQUIRE(store->memory_report().verified_loads == 3);
  }
  SECTION("a side file altered in place (same size): its checksum catches it") {
    auto [family, store] = evicted_family("side");
    const std::string config = family.experts[0] + "/expert/config.json";
    std::string bytes = copy_of(config);
    bytes[1] = bytes[1] == ' ' ? '\t' : ' ';
    {
      std::fstream file(config, std::ios::in | std::ios::out | std::ios::binary);
      file.write(bytes.data(), std::streamsize(bytes.size()));
    }
    REQUIRE_THROWS_WITH(store->acquire("side_e0"), Contains(config) && Contains("does not match the manifest"));
  }
  SECTION("a file added to expert/: refused as unlisted, as by a first load") {
    auto [family, store] = evicted_family("unlisted");
    write_bytes(family.experts[0] + "/expert/extra.txt", "x");
    REQUIRE_THROWS_WITH(store->acquire("unlisted_e0"), Contains("extra.txt") && Contains("not listed"));
  }
}

TEST_CASE("tier says where one expert is without a whole report", "[store]") {
  const Family family = family_of("tier", 2);
  ExpertStore store(family.base, kConfig, family.bytes);
  store.add(family.experts[0]);
  store.add(family.experts[1]);
  REQUIRE(store.tier("tier_e0") == StoreTier::Disk);
  store.acquire("tier_e0");
  REQUIRE(store.tier("tier_e0") == StoreTier::Host);
  store.acquire("tier_e1");
  REQUIRE(store.tier("tier_e0") == StoreTier::Disk);
  REQUIRE(std::string(store_tier_name(store.tier("tier_e1"))) == "host");
  REQUIRE_THROWS_WITH(store.tier("nobody"), Contains("no expert named 'nobody'"));
  store.prefetch("tier_e0");
  store.wait("tier_e0");
  REQUIRE(store.tier("tier_e0") == StoreTier::Host);
}
