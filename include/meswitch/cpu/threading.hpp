// The one place where CPU kernels start threads.
//
// A parallel-for over independent work items (row tiles of a GEMM), with the
// thread count taken from the caller, else MESWITCH_NUM_THREADS, else the number of
// hardware threads. Threads live for one call only: there is no pool and no global
// state, so two callers never contend for hidden workers and nothing outlives a call.
// Items are handed out through an atomic counter rather than split up front, because
// the machines this runs on are often shared and a statically split half can stall
// behind another process while the other half idles.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "meswitch/error.hpp"

namespace meswitch::cpu {

// MESWITCH_NUM_THREADS when set (a positive integer), otherwise the hardware count.
inline int default_num_threads() {
  if (const char* text = std::getenv("MESWITCH_NUM_THREADS"); text != nullptr && *text != '\0') {
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || value < 1 || value > 4096)
      throw Error(std::string("MESWITCH_NUM_THREADS='") + text + "' is not a positive integer");
    return int(value);
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : int(hardware);
}

// `requested` > 0 wins; 0 means "the default" above.
inline int resolve_num_threads(int requested) {
  if (requested < 0) throw Error("num_threads must be >= 0 (0 = default), got " + std::to_string(requested));
  return requested > 0 ? requested : default_num_threads();
}

// Calls work(worker, item) for every item in [0, count), worker in [0, threads).
// Each worker handles its items sequentially, so per-worker scratch indexed by
// `worker` needs no locking. The first exception thrown by any item is rethrown
// here after every thread has joined; remaining items are skipped.
template <typename Work>
void parallel_for(std::int64_t count, int threads, Work&& work) {
  if (count <= 0) return;
  const int workers = int(std::min<std::int64_t>(std::max(threads, 1), count));
  if (workers == 1) {
    for (std::int64_t item = 0; item < count; ++item) work(0, item);
    return;
  }
  std::atomic<std::int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int worker) {
    try {
      for (std::int64_t item = next.fetch_add(1); item < count && !failed.load(std::memory_order_relaxed);
           item = next.fetch_add(1))
        work(worker, item);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(std::size_t(workers - 1));
  for (int worker = 1; worker < workers; ++worker) pool.emplace_back(run, worker);
  run(0);  // the calling thread works too instead of waiting idle
  for (std::thread& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace meswitch::cpu
