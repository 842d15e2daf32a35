// The one place where CPU kernels run work on several threads.
//
// A parallel-for over independent work items (row tiles of a GEMM), with the thread
// count taken from the caller, else MESWITCH_NUM_THREADS, else the number of hardware
// threads. Items are handed out through an atomic counter rather than split up front,
// because the machines this runs on are often shared and a statically split half can
// stall behind another process while the other half idles.
//
// The threads are a process-wide pool started on first use, because starting threads
// costs tens of microseconds: as much as a whole one-token delta GEMV. Idle workers
// spin briefly (the next layer's call usually follows within microseconds), then sleep
// on a condition variable. One job runs at a time; a caller that finds the pool busy,
// or calls from inside a job, runs its items on its own thread instead of waiting.
// After fork() the child starts a fresh pool (the parent's threads do not exist there).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MESWITCH_SPIN_PAUSE() _mm_pause()
#else
#define MESWITCH_SPIN_PAUSE() std::this_thread::yield()
#endif

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

namespace detail {

// Spins until ready() or until `budget` has passed; true if ready() came true.
template <typename Ready>
bool spin_until(Ready&& ready, std::chrono::microseconds budget) {
  const auto deadline = std::chrono::steady_clock::now() + budget;
  for (int spin = 1;; ++spin) {
    if (ready()) return true;
    MESWITCH_SPIN_PAUSE();
    if (spin % 64 == 0 && std::chrono::steady_clock::now() > deadline) return ready();
  }
}

class WorkerPool {
 public:
  // Runs job(worker) on workers 1 .. helpers (pool threads) while the caller runs
  // job(0); returns when all have returned. False if the pool is busy (another caller's
  // job is running), so the caller must do the work itself.
  bool run(int helpers, const std::function<void(int)>& job) {
    if (inside_job()) return false;  // nested: this thread may already hold busy_
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = helpers;
      pending_.store(helpers, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    inside_job() = true;
    job(0);
    inside_job() = false;
    auto finished = [&] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(finished, kSpin)) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, finished);
    }
    return true;
  }

  // The process's pool (never destroyed: detached workers use it until exit); a
  // fresh one in a forked child.
  static WorkerPool& instance() {
    static const bool registered = [] {
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork(nullptr, nullptr, [] { current().store(nullptr); });
#endif
      return true;
    }();
    (void)registered;
    WorkerPool* pool = current().load(std::memory_order_acquire);
    if (pool != nullptr) return *pool;
    auto fresh = std::make_unique<WorkerPool>();  // no threads yet: cheap to drop if we lose the race
    if (current().compare_exchange_strong(pool, fresh.get(), std::memory_order_acq_rel)) return *fresh.release();
    return *pool;
  }

 private:
  // How long idle threads spin before sleeping: long enough to catch the next
  // layer's call, short enough not to hold a core from whatever runs in between.
  static constexpr std::chrono::microseconds kSpin{50};

  static std::atomic<WorkerPool*>& current() {
    static std::atomic<WorkerPool*> pool{nullptr};
    return pool;
  }
  static bool& inside_job() {
    thread_local bool inside = false;
    return inside;
  }

  void grow(int helpers) {
    while (int(threads_.size()) < helpers) {
      const int worker = int(threads_.size()) + 1;
      threads_.emplace_back([this, worker] { loop(worker); });
      threads_.back().detach();  // the pool lives until the process exits
    }
  }

  void loop(int worker) {
    inside_job() = true;  // a kernel called from a job runs inline
    std::uint64_t seen = 0;
    for (;;) {
      auto posted = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(posted, kSpin)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, posted);
      }
      const std::function<void(int)>* job;
      int active;
      {
        // One snapshot of generation, job and count (written together under this lock):
        // a worker that was not needed for one job may wake only after the next is posted.
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        active = active_;
      }
      if (worker > active || job == nullptr) continue;  // not needed for this job
      (*job)(worker);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }

  std::mutex busy_;   // held by the caller for a whole job
  std::mutex mutex_;  // guards job_, active_ and the condition variables
  std::condition_variable wake_, done_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0;
  std::vector<std::thread> threads_;
};

}  // namespace detail

// Calls work(worker, item) for every item in [0, count), worker in [0, threads).
// Each worker handles its items sequentially, so per-worker scratch indexed by
// `worker` needs no locking. The first exception thrown by any item is rethrown
// here after every worker has finished; remaining items are skipped.
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
  // Items go out in runs of `grain`, about 8 runs per worker: enough to even out a
  // stalled worker, few enough that the shared counter's cache line is not bounced
  // between cores once per (often sub-microsecond) item.
  const std::int64_t grain = std::max<std::int64_t>(1, count / (std::int64_t(workers) * 8));
  const std::function<void(int)> run = [&](int worker) {
    try {
      for (std::int64_t begin = next.fetch_add(grain); begin < count && !failed.load(std::memory_order_relaxed);
           begin = next.fetch_add(grain))
        for (std::int64_t item = begin; item < std::min(count, begin + grain); ++item) work(worker, item);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  if (!detail::WorkerPool::instance().run(workers - 1, run)) run(0);  // pool busy: this thread does it all
  if (error) std::rethrow_exception(error);
}

}  // namespace meswitch::cpu

#undef MESWITCH_SPIN_PAUSE
