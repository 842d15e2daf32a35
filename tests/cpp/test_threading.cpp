// The worker pool behind parallel_for: every item exactly once, errors rethrown,
// nested and concurrent callers served without deadlock, and a forked child gets
// working threads of its own.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <catch2/catch.hpp>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

#include "meswitch/cpu/threading.hpp"

using namespace meswitch::cpu;

namespace {

// True when parallel_for visits each of `count` items exactly once with workers in range.
bool visits_each_item_once(std::int64_t count, int threads) {
  std::vector<std::atomic<int>> visits(static_cast<std::size_t>(count));
  std::atomic<bool> worker_in_range{true};
  parallel_for(count, threads, [&](int worker, std::int64_t item) {
    if (worker < 0 || worker >= threads) worker_in_range = false;
    visits[std::size_t(item)].fetch_add(1);
  });
  for (auto& v : visits)
    if (v.load() != 1) return false;
  return worker_in_range.load();
}

}  // namespace

TEST_CASE("parallel_for visits every item once for any thread count", "[threading]") {
  for (int threads : {1, 2, 3, 8})
    for (std::int64_t count : {0, 1, 2, 7, 1000}) {
      INFO("threads " << threads << " count " << count);
      REQUIRE(visits_each_item_once(count, threads));
    }
  // Back-to-back calls with changing thread counts reuse and grow the pool.
  for (int round = 0; round < 200; ++round) REQUIRE(visits_each_item_once(64, 1 + round % 4));
}

TEST_CASE("parallel_for rethrows the first error after all workers stop", "[threading]") {
  // One thread: items run in order, so exactly items 0..5 ran and the rest were skipped.
  std::vector<int> serial(100, 0);
  REQUIRE_THROWS_WITH(parallel_for(100, 1,
                                   [&](int, std::int64_t item) {
                                     ++serial[std::size_t(item)];
                                     if (item == 5) throw std::runtime_error("item 5 failed");
                                   }),
                      "item 5 failed");
  for (std::int64_t item = 0; item < 100; ++item) {
    INFO("item " << item);
    REQUIRE(serial[std::size_t(item)] == (item <= 5 ? 1 : 0));
  }

  // Several threads: which other items ran depends on timing, but none ran twice, the
  // failing one ran once, and nothing runs any more once the error is rethrown.
  for (int round = 0; round < 20; ++round) {
    std::vector<std::atomic<int>> visits(100);
    REQUIRE_THROWS_WITH(parallel_for(100, 3,
                                     [&](int, std::int64_t item) {
                                       visits[std::size_t(item)].fetch_add(1);
                                       if (item == 5) throw std::runtime_error("item 5 failed");
                                     }),
                        "item 5 failed");
    std::vector<int> seen(100);
    for (std::size_t item = 0; item < 100; ++item) seen[item] = visits[item].load();
    REQUIRE(seen[5] == 1);
    REQUIRE(std::all_of(seen.begin(), seen.end(), [](int count) { return count == 0 || count == 1; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (std::size_t item = 0; item < 100; ++item) REQUIRE(visits[item].load() == seen[item]);
  }
  REQUIRE(visits_each_item_once(50, 3));  // the pool still works afterwards
}

TEST_CASE("parallel_for nested inside a job runs inline", "[threading]") {
  std::atomic<std::int64_t> total{0};
  std::atomic<bool> inline_only{true};
  parallel_for(8, 2, [&](int, std::int64_t) {
    parallel_for(10, 2, [&](int worker, std::int64_t item) {
      if (worker != 0) inline_only = false;  // the inner loop stays on the calling thread
      total.fetch_add(item);
    });
  });
  REQUIRE(total.load() == 8 * 45);
  REQUIRE(inline_only.load());
}

TEST_CASE("parallel_for from several threads at once", "[threading]") {
  std::atomic<bool> all_ok{true};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&, c] {
      for (int round = 0; round < 100; ++round)
        if (!visits_each_item_once(33 + c, 2)) all_ok = false;
    });
  for (auto& caller : callers) caller.join();
  REQUIRE(all_ok.load());
}

TEST_CASE("parallel_for works in a forked child", "[threading]") {
  REQUIRE(visits_each_item_once(100, 2));  // the parent's pool has threads now
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(visits_each_item_once(100, 2) && visits_each_item_once(10, 3) ? 0 : 1);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
}
