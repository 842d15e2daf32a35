// The expert store: the experts a server can run, which tier each one's bytes are in,
// and the byte budget each tier keeps.
//
// Tiers
//   disk    every added artifact (NAME.meswitch/, artifact.hpp). No budget; nothing is
//           held in memory for it but its name, directory and size.
//   host    loaded experts: the artifact opened and checked, its shards read into
//           page-aligned memory the store owns (ShardMemory::Resident). The kernels read
//           the packed pieces straight from those buffers, in the stored layout; nothing
//           is unpacked or copied again. A load also gathers what the expert changes in the
//           base (ExpertTensors, expert_tensors.hpp: deltas, whole tensors, extra rows, the
//           embedding lookup), views into those buffers; a Handle or BatchLease hands it out.
//
// Checks are made once per expert: its first load checks everything an open checks
// (manifest, shard headers, every delta's contents) and every shard and side file against
// the manifest's sha256, and keeps what it established with each file's identity
// (ArtifactRecord; FileIdentity: inode, size, mtime, ctime). A reload after eviction, when
// every file is still that file unchanged, reads the shards' bytes and nothing else
// (ExpertArtifact::reopen): parsing, validating and hashing again would cost several
// times the read. When any file changed, the reload opens and verifies everything again,
// as a first load. Side files are checked again whenever one is read
// (ExpertArtifact::read_side_file). A load hashes each shard while it reads it, and takes
// over the buffers of the experts it evicts when nobody else holds them (their pages are
// already made, which costs more than the copy).
//   device  kept beside this store, in python/meswitch/store/device_tier.py (CUDA builds):
//           the packed pieces repacked into the kernel's tile layout through pinned buffers
//           and copied asynchronously into a device byte budget kept by the same eviction
//           rule (eviction.hpp, through the bindings); not yet run on a GPU.
//
// What a host byte is: an expert counts the sizes of its shard files, each rounded up to
// whole pages, which is what its buffers take. The parsed manifest and shard headers
// (kilobytes), kept after eviction for the next reload, are not counted. Owned buffers
// rather than a mapping whose pages are faulted in: the kernel may drop a clean
// file-backed page at any time and read it again from a file that may have
// been replaced since it was verified, so a mapping's "resident" bytes promise nothing;
// owned buffers stay (at worst swapped), their checksum is over the very bytes the kernels
// read, and they are what a CUDA build pins.
//
// Budget: bytes resident plus bytes of loads in flight never pass the host budget. A
// load reserves its bytes before it reads anything, evicting experts nobody holds and
// nobody pinned, least recently acquired first (eviction.hpp, the rule of every tier).
// When that is not enough (everything resident is held, pinned or loading) the load fails
// at once with TierFull naming the expert, its bytes, the budget and who holds the tier;
// it does not wait, because a caller holding one expert while acquiring another could
// wait forever. An expert larger than the budget is refused with an Error.
//
// Holding: acquire() returns a Handle; while any Handle of an expert lives (a running batch
// uses it) the expert is never evicted. pin() loads an expert and keeps it resident until
// unpin(). acquire_batch() takes one hold on each expert of a batch, all or none (a
// BatchLease). acquire_if_resident() holds an expert only if it is resident now, without
// loading or waiting (an engine admitting requests asks it every step).
//
// Claims: a request that will use an expert claims it (claim() returns a Claim) from when
// it is accepted until it ends, resident or not; a Claim holds no memory. Holds and claims
// are the one count of who uses an expert: the store keeps both, and remove() reads both.
//
// Removal: remove() of a claimed expert is refused at once with an Error naming how many
// requests use it (they may run for minutes). One only held or loading (a batch or an
// engine letting go after its last request) either drains (new claims and acquires
// refused, the removal done when the last holder lets go, within a time limit) or is
// refused with an Error naming the holders; otherwise the expert leaves every tier at once,
// pinned or not.
//
// add() opens the artifact (its structure checked; checksums wait for the load) and checks
// its base fingerprint against the store's base, hashed once when the store is made; a
// wrong base is refused naming the first differing tensor.
//
// Prefetch: prefetch() queues the load for the store's one background thread, started on
// the first prefetch and joined when the store goes away, and returns at once (an expert
// larger than the budget is refused there). The thread reserves the bytes when it starts
// the load, not when it is queued, so queued prefetches hold no budget; a prefetch that
// finds no room then is skipped (a hint, counted as prefetches_skipped), and a later
// acquire() makes its own attempt. acquire() of an expert being loaded waits for that
// load, and one of a queued expert takes it out of the queue and loads it itself; wait()
// waits for a queued prefetch too. A failed background load is thrown from
// every acquire() or wait() waiting on it or, when none was, from the next one for that
// expert (once: the acquire after that loads again).
//
// Queries: tier() says where one expert is (disk, loading, host) for a scheduler asking
// every step; memory_report() snapshots everything.
//
// Thread safety: one mutex and one condition variable guard all state; reading, hashing
// and freeing expert bytes happen outside the lock. Handles may outlive the store. Views
// taken from a Handle's artifact must not outlive the Handle: after release the expert may
// be evicted and its bytes are no longer counted.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "meswitch/artifact.hpp"
#include "meswitch/expert_tensors.hpp"
#include "meswitch/error.hpp"
#include "meswitch/eviction.hpp"
#include "meswitch/sharded_safetensors.hpp"

namespace meswitch {

// Where one expert's bytes are: only on disk, being read into host memory, or resident there.
enum class StoreTier { Disk, Loading, Host };

inline const char* store_tier_name(StoreTier tier) {
  switch (tier) {
    case StoreTier::Disk: return "disk";
    case StoreTier::Loading: return "loading";
    case StoreTier::Host: return "host";
  }
  return "?";
}

// Per tier: bytes in use (resident plus loads in flight), budget (0: none), experts resident.
struct StoreTierReport {
  std::string tier;
  std::uint64_t used_bytes = 0;
  std::uint64_t budget_bytes = 0;
  std::size_t entries = 0;
  std::size_t loading = 0;
};

// One expert: where it is ("disk", "loading" or "host"), its host bytes, who holds it.
struct StoreExpertReport {
  std::string name;
  std::string directory;
  std::string tier;
  std::uint64_t bytes = 0;
  std::size_t holders = 0;  // Handles: running batches, an engine's running requests
  std::size_t claims = 0;   // Claims: requests accepted and not ended, resident or not
  bool pinned = false;
  std::uint64_t loads = 0;          // completed loads of this expert (disk -> host)
  double load_seconds = 0;          // summed over them
  std::uint64_t waited_acquires = 0;  // acquires that found it not resident and waited or loaded
  double wait_seconds = 0;            // what those acquires waited, summed
};

struct StoreReport {
  std::vector<StoreTierReport> tiers;      // "disk", "host"
  std::vector<StoreExpertReport> experts;  // by name
  std::uint64_t hits = 0;                  // acquires that found the expert resident
  std::uint64_t misses = 0;                // acquires that waited for or made a load
  std::uint64_t evictions = 0;
  std::uint64_t loads = 0;           // completed loads (disk -> host)
  std::uint64_t verified_loads = 0;  // of which hashed every shard (first loads, changed files)
  std::uint64_t load_failures = 0;
  std::uint64_t prefetches_skipped = 0;  // found no room when the background thread came to them
  std::uint64_t recycled_buffers = 0;    // shard buffers loads took over from experts they evicted
  double load_seconds = 0;  // summed over completed loads
};

class ExpertStore {
  struct Load {
    bool done = false;
    std::size_t waiters = 0;
    std::exception_ptr error;
  };

  struct Entry {
    std::string name;
    std::string directory;
    std::uint64_t bytes = 0;                         // host bytes once loaded
    std::shared_ptr<const ExpertTensors> expert;  // set while resident on the host tier
    std::shared_ptr<Load> loading;                   // set while a load is in flight
    std::exception_ptr failed;                       // a background failure nobody has seen yet
    std::shared_ptr<const ArtifactRecord> verified;  // what its last verified load checked
    std::size_t holders = 0;
    std::size_t claims = 0;  // requests that will use it (Claim)
    bool pinned = false;
    bool queued = false;    // a prefetch waits in the queue
    bool draining = false;  // a remove() waits for its holders: new acquires are refused
    std::uint64_t last_used = 0;
    std::uint64_t loads = 0;
    double load_seconds = 0;
    std::uint64_t waited_acquires = 0;
    double wait_seconds = 0;
  };

  struct State {
    std::mutex mutex;
    std::condition_variable changed;
    std::map<std::string, std::shared_ptr<Entry>> entries;
    std::uint64_t budget = 0;
    std::uint64_t used = 0;
    std::uint64_t clock = 0;
    std::deque<std::shared_ptr<Entry>> queue;  // prefetches not started (no bytes reserved)
    bool stopping = false;
    StoreReport counters;
  };

 public:
  // An expert held resident: never evicted while this lives. Move-only; release() or the
  // destructor lets go.
  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& other) noexcept { *this = std::move(other); }
    Handle& operator=(Handle&& other) noexcept {
      if (this != &other) {
        release();
        state_ = std::move(other.state_);
        entry_ = std::move(other.entry_);
        expert_ = std::move(other.expert_);
      }
      return *this;
    }
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { release(); }

    explicit operator bool() const { return expert_ != nullptr; }
    const std::string& name() const {
      require();
      return entry_->name;
    }
    const ExpertArtifact& artifact() const {
      require();
      return expert_->artifact();
    }
    const std::shared_ptr<const ExpertArtifact>& shared_artifact() const {
      require();
      return expert_->shared_artifact();
    }
    // What the expert changes in the base, ready to apply (expert_tensors.hpp).
    const ExpertTensors& tensors() const {
      require();
      return *expert_;
    }
    const std::shared_ptr<const ExpertTensors>& shared_tensors() const {
      require();
      return expert_;
    }

    void release() {
      if (!state_) return;
      {
        std::lock_guard<std::mutex> lock(state_->mutex);
        --entry_->holders;
      }
      state_->changed.notify_all();
      state_.reset();
      entry_.reset();
      expert_.reset();
    }

   private:
    friend class ExpertStore;
    Handle(std::shared_ptr<State> state, std::shared_ptr<Entry> entry)
        : state_(std::move(state)), entry_(std::move(entry)), expert_(entry_->expert) {}

    void require() const {
      if (!expert_) throw Error("this expert handle was released (or never held an expert)");
    }

    std::shared_ptr<State> state_;
    std::shared_ptr<Entry> entry_;
    std::shared_ptr<const ExpertTensors> expert_;
  };

  // A request's use of an expert, from its acceptance to its end: the expert cannot be
  // removed while claimed, but a claim holds no memory (the expert may be evicted and loaded
  // again meanwhile). Move-only; release() or the destructor lets go. Thread-safe, like Handle.
  class Claim {
   public:
    Claim() = default;
    Claim(Claim&& other) noexcept { *this = std::move(other); }
    Claim& operator=(Claim&& other) noexcept {
      if (this != &other) {
        release();
        state_ = std::move(other.state_);
        entry_ = std::move(other.entry_);
      }
      return *this;
    }
    Claim(const Claim&) = delete;
    Claim& operator=(const Claim&) = delete;
    ~Claim() { release(); }

    explicit operator bool() const { return state_ != nullptr; }

    void release() {
      if (!state_) return;
      {
        std::lock_guard<std::mutex> lock(state_->mutex);
        --entry_->claims;
      }
      state_->changed.notify_all();
      state_.reset();
      entry_.reset();
    }

   private:
    friend class ExpertStore;
    Claim(std::shared_ptr<State> state, std::shared_ptr<Entry> entry)
        : state_(std::move(state)), entry_(std::move(entry)) {}

    std::shared_ptr<State> state_;
    std::shared_ptr<Entry> entry_;
  };

  // `base_path`: the base checkpoint (directory or .safetensors), `base_config_text` its
  // config.json; both are fingerprinted now, once, for every add().
  ExpertStore(const std::string& base_path, const std::string& base_config_text, std::uint64_t host_budget_bytes)
      : state_(std::make_shared<State>()), base_(SafetensorsCheckpoint::open(base_path)),
        fingerprint_(base_fingerprint(base_, base_config_text)) {
    if (host_budget_bytes == 0) throw Error("the store's host budget must be a positive number of bytes");
    state_->budget = host_budget_bytes;
  }

  ~ExpertStore() {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      state_->stopping = true;
      for (const auto& entry : state_->queue) entry->queued = false;
      state_->queue.clear();
    }
    state_->changed.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  std::uint64_t host_budget() const { return state_->budget; }

  // Adds the artifact at `directory` to the disk tier and returns its name.
  std::string add(const std::string& directory) {
    const ExpertArtifact artifact = ExpertArtifact::open(directory, /*verify_checksums=*/false);
    artifact.check_base_fingerprint(base_, fingerprint_);
    auto entry = std::make_shared<Entry>();
    entry->name = artifact.manifest().at("name").get<std::string>();
    entry->directory = directory;
    entry->bytes = host_bytes(artifact.shard_sizes());
    std::lock_guard<std::mutex> lock(state_->mutex);
    const auto found = state_->entries.find(entry->name);
    if (found != state_->entries.end())
      throw Error("the store already has an expert named '" + entry->name + "' (from " + found->second->directory +
                  "); remove it before adding " + directory);
    state_->entries.emplace(entry->name, entry);
    return entry->name;
  }

  // Drops the expert from every tier. A claimed expert is refused at once, naming how many
  // requests use it. While handles hold it (running batches) or a load of it is in flight,
  // `drain` says how long to wait for them: meanwhile the expert is draining (every new
  // claim(), acquire() or prefetch() of it is refused, naming why) and the removal happens
  // when the last holder lets go. With no time to wait, or when it runs out, the removal is
  // refused with an Error naming the holders, and the expert is served again.
  void remove(const std::string& name, std::chrono::milliseconds drain = std::chrono::milliseconds(0)) {
    std::shared_ptr<const ExpertTensors> freed;  // destroyed after the lock is let go
    std::unique_lock<std::mutex> lock(state_->mutex);
    const std::shared_ptr<Entry> entry = find(name);
    if (entry->claims > 0)
      throw Error("cannot remove expert '" + name + "': " + std::to_string(entry->claims) +
                  " request(s) use it; remove it once they have finished");
    const auto idle = [&] { return entry->holders == 0 && !entry->loading; };
    if (!idle() && drain.count() > 0) {
      entry->draining = true;
      const bool drained = state_->changed.wait_for(lock, drain, idle);
      const auto found = state_->entries.find(name);
      if (found == state_->entries.end() || found->second != entry) return;  // another remove() finished it
      entry->draining = false;
      if (!drained) state_->changed.notify_all();
    }
    if (entry->holders > 0)
      throw Error("cannot remove expert '" + name + "': " + std::to_string(entry->holders) +
                  " handle(s) hold it (running batches)" +
                  (drain.count() > 0 ? " after waiting " + std::to_string(drain.count()) + " ms for them to end"
                                     : "; remove it once they are released"));
    if (entry->loading) throw Error("cannot remove expert '" + name + "' while it is being loaded; wait() for it first");
    if (entry->expert) state_->used -= entry->bytes;
    freed = std::move(entry->expert);
    if (entry->queued) unqueue(entry);
    state_->entries.erase(name);
    state_->changed.notify_all();
  }

  // Holds on several experts taken together for one batch: all of them or none. Move-only;
  // release() or the destructor lets go of every hold.
  class BatchLease {
   public:
    BatchLease() = default;
    BatchLease(BatchLease&&) noexcept = default;
    BatchLease& operator=(BatchLease&&) noexcept = default;

    // The hold on `name`; throws Error for an expert this lease does not hold.
    const Handle& operator[](const std::string& name) const {
      const auto found = handles_.find(name);
      if (found == handles_.end()) throw Error("this batch lease holds no expert named '" + name + "'");
      return found->second;
    }
    std::vector<std::string> names() const {
      std::vector<std::string> names;
      for (const auto& item : handles_) names.push_back(item.first);
      return names;
    }
    bool empty() const { return handles_.empty(); }
    void release() { handles_.clear(); }

   private:
    friend class ExpertStore;
    std::map<std::string, Handle> handles_;
  };

  // One hold on each of `names` (repeats are one): every expert is loaded or waited for as
  // acquire() does. When one cannot be had, the holds taken so far are let go and its error
  // is thrown, so a batch never runs on part of its experts.
  BatchLease acquire_batch(const std::vector<std::string>& names) {
    BatchLease lease;
    for (const std::string& name : names)
      if (lease.handles_.find(name) == lease.handles_.end()) lease.handles_.emplace(name, acquire(name));
    return lease;
  }

  // A claim on the expert for one request (see Claim). Throws Error for an unknown expert
  // or one being removed.
  Claim claim(const std::string& name) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const std::shared_ptr<Entry> entry = find(name);
    refuse_if_draining(*entry);
    ++entry->claims;
    return Claim(state_, entry);
  }

  // The expert held as acquire() holds it when it is resident on the host tier now; an
  // empty Handle when it is not (nothing is loaded or waited for, and no miss is counted).
  // Throws Error for an unknown expert or one being removed.
  Handle acquire_if_resident(const std::string& name) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const std::shared_ptr<Entry> entry = find(name);
    refuse_if_draining(*entry);
    if (!entry->expert) return Handle();
    ++state_->counters.hits;
    ++entry->holders;
    entry->last_used = ++state_->clock;
    return Handle(state_, entry);
  }

  // The expert, resident on the host tier and held until the Handle goes; loads it (in
  // this thread) or waits for a load in flight when it is not resident.
  Handle acquire(const std::string& name) {
    std::unique_lock<std::mutex> lock(state_->mutex);
    bool counted = false;
    const auto asked = std::chrono::steady_clock::now();
    // Under the lock: an acquire that missed adds what it waited to the expert's counters.
    const auto count_wait = [&](Entry& entry) {
      ++entry.waited_acquires;
      entry.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - asked).count();
    };
    for (;;) {
      const std::shared_ptr<Entry> entry = find(name);
      refuse_if_draining(*entry);
      if (entry->expert) {
        if (!counted) ++state_->counters.hits;
        if (counted) count_wait(*entry);
        ++entry->holders;
        entry->last_used = ++state_->clock;
        return Handle(state_, entry);
      }
      if (!counted) ++state_->counters.misses;
      counted = true;
      if (entry->failed) std::rethrow_exception(std::exchange(entry->failed, nullptr));
      if (entry->loading) {
        wait_for_load(lock, entry);  // resident now unless evicted since: look again
        continue;
      }
      std::vector<std::shared_ptr<const ExpertTensors>> evicted = reserve(*entry);
      if (entry->queued) unqueue(entry);  // loaded here rather than behind other prefetches
      lock.unlock();
      state_->changed.notify_all();  // wait() of this expert: it left the queue
      load(entry, std::move(evicted), /*background=*/false);
      lock.lock();
      count_wait(*entry);
      return Handle(state_, entry);  // load() took the hold with the lock
    }
  }

  // Queues the expert for the background thread and returns at once (nothing to do when
  // it is resident, loading or queued). Throws at once when it can never fit.
  void prefetch(const std::string& name) {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      const std::shared_ptr<Entry> entry = find(name);
      refuse_if_draining(*entry);
      if (entry->expert || entry->loading || entry->queued) return;
      check_fits_tier("host", entry->name, entry->bytes, state_->budget);
      entry->failed = nullptr;  // this attempt replaces the one that failed
      entry->queued = true;
      state_->queue.push_back(entry);
      if (!worker_.joinable()) worker_ = std::thread([this] { run_background_loads(); });
    }
    state_->changed.notify_all();
  }

  // Waits for a queued prefetch or a load in flight of the expert; throws its error (or
  // that of a background load that failed unseen). Returns at once when there is none.
  void wait(const std::string& name) {
    std::unique_lock<std::mutex> lock(state_->mutex);
    const std::shared_ptr<Entry> entry = find(name);
    state_->changed.wait(lock, [&] { return !entry->queued; });
    if (entry->failed) std::rethrow_exception(std::exchange(entry->failed, nullptr));
    if (entry->loading) wait_for_load(lock, entry);
  }

  // Loads the expert if needed and keeps it resident until unpin().
  void pin(const std::string& name) {
    Handle held = acquire(name);
    std::lock_guard<std::mutex> lock(state_->mutex);
    held.entry_->pinned = true;
  }

  void unpin(const std::string& name) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    find(name)->pinned = false;
  }

  std::vector<std::string> names() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    std::vector<std::string> names;
    for (const auto& item : state_->entries) names.push_back(item.first);
    return names;
  }

  // Where the expert is now, without building a whole memory_report (a scheduler asks
  // this for every expert of every step). Throws Error for an unknown name.
  StoreTier tier(const std::string& name) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return tier_of(*find(name));
  }

  // A consistent snapshot of both tiers, every expert and the counters.
  StoreReport memory_report() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    StoreReport report = state_->counters;
    StoreTierReport disk{"disk", 0, 0, 0, 0};
    StoreTierReport host{"host", state_->used, state_->budget, 0, 0};
    for (const auto& item : state_->entries) {
      const Entry& entry = *item.second;
      disk.used_bytes += entry.bytes;
      ++disk.entries;
      const char* tier = store_tier_name(tier_of(entry));
      if (entry.expert) ++host.entries;
      if (entry.loading) ++host.loading;
      report.experts.push_back({entry.name, entry.directory, tier, entry.bytes, entry.holders, entry.claims,
                                entry.pinned, entry.loads, entry.load_seconds, entry.waited_acquires,
                                entry.wait_seconds});
    }
    report.tiers = {disk, host};
    return report;
  }

 private:
  // The host bytes of an expert whose shards have these sizes: each buffer takes whole pages.
  static std::uint64_t host_bytes(const std::vector<std::uint64_t>& shard_sizes) {
    const std::uint64_t page = std::uint64_t(::sysconf(_SC_PAGESIZE));
    std::uint64_t total = 0;
    for (const std::uint64_t size : shard_sizes) total += (size + page - 1) / page * page;
    return total;
  }

  // Under the lock.
  std::shared_ptr<Entry> find(const std::string& name) const {
    const auto found = state_->entries.find(name);
    if (found != state_->entries.end()) return found->second;
    std::string known;
    for (const auto& item : state_->entries) known += (known.empty() ? "" : ", ") + item.first;
    throw Error("the store has no expert named '" + name + "' (it has: " + (known.empty() ? "none" : known) + ")");
  }

  // Under the lock.
  static void refuse_if_draining(const Entry& entry) {
    if (entry.draining)
      throw Error("expert '" + entry.name + "' is being removed: it takes no new requests");
  }

  // Under the lock: makes room for `entry` on the host tier (eviction.hpp: the rule every
  // tier keeps) and counts its bytes as used, marking it loading. Returns the evicted
  // experts' bytes, to be freed after the lock.
  std::vector<std::shared_ptr<const ExpertTensors>> reserve(Entry& entry) {
    State& state = *state_;
    std::vector<Entry*> order;  // what the host tier counts, least recently used first
    for (const auto& item : state.entries)
      if (item.second->expert || item.second->loading) order.push_back(item.second.get());
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) { return a->last_used < b->last_used; });
    std::vector<TierResident> residents;
    for (const Entry* other : order)
      residents.push_back({other->name, other->bytes,
                           other->loading ? "loading" : other->holders > 0 ? "held" : other->pinned ? "pinned" : ""});
    std::vector<std::shared_ptr<const ExpertTensors>> evicted;
    for (const std::size_t victim : choose_evictions("host", entry.name, entry.bytes, state.used, state.budget, residents)) {
      state.used -= order[victim]->bytes;
      evicted.push_back(std::move(order[victim]->expert));
      ++state.counters.evictions;
    }
    state.used += entry.bytes;
    entry.loading = std::make_shared<Load>();
    return evicted;
  }

  // The artifacts of evicted experts whose tensors nobody else holds, for their buffers to be
  // recycled (ExpertArtifact::take_buffers); the tensors are let go first, since their
  // deltas hold the shard buffers too.
  static std::vector<std::shared_ptr<const ExpertArtifact>> artifacts_of(
      std::vector<std::shared_ptr<const ExpertTensors>>&& evicted) {
    std::vector<std::shared_ptr<const ExpertArtifact>> artifacts;
    for (std::shared_ptr<const ExpertTensors>& expert : evicted) {
      if (expert && expert.use_count() == 1) artifacts.push_back(expert->shared_artifact());
      expert.reset();
    }
    evicted.clear();
    return artifacts;
  }

  // Under the lock.
  void unqueue(const std::shared_ptr<Entry>& entry) {
    entry->queued = false;
    state_->queue.erase(std::find(state_->queue.begin(), state_->queue.end(), entry));
  }

  static StoreTier tier_of(const Entry& entry) {
    return entry.expert ? StoreTier::Host : entry.loading ? StoreTier::Loading : StoreTier::Disk;
  }

  // Under the lock: ends the entry's load in flight and wakes its waiters.
  static void finish_load(Entry& entry, std::exception_ptr error) {
    const std::shared_ptr<Load> load = std::move(entry.loading);
    load->done = true;
    load->error = error;
  }

  // Under the lock (held by `lock`); throws the load's error.
  void wait_for_load(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Entry>& entry) {
    const std::shared_ptr<Load> load = entry->loading;
    ++load->waiters;
    state_->changed.wait(lock, [&] { return load->done; });
    --load->waiters;
    if (load->error) std::rethrow_exception(load->error);
  }

  // Reads (and on a first load or after a change verifies) the reserved expert without
  // the lock, recycling the buffers of `evicted`, then publishes it. A foreground load
  // takes a hold in the same step (nothing can evict it in between) and throws its error;
  // a background one leaves the error to the waiters or the next caller.
  void load(const std::shared_ptr<Entry>& entry, std::vector<std::shared_ptr<const ExpertTensors>> evicted,
            bool background) {
    const auto start = std::chrono::steady_clock::now();
    std::shared_ptr<const ExpertArtifact> artifact;
    std::shared_ptr<const ExpertTensors> expert;
    std::exception_ptr error;
    // `verified` is written only by this entry's one load at a time.
    const std::shared_ptr<const ArtifactRecord> previous = entry->verified;
    bool verified = false;
    try {
      std::vector<std::shared_ptr<MappedFile>> spares = ExpertArtifact::take_buffers(artifacts_of(std::move(evicted)));
      std::optional<ExpertArtifact> reopened;
      if (previous) reopened = ExpertArtifact::reopen(previous, &spares);
      if (reopened) {
        artifact = std::make_shared<const ExpertArtifact>(std::move(*reopened));
      } else {  // a first load, or a file changed since: trust nothing
        verified = true;
        artifact = std::make_shared<const ExpertArtifact>(
            ExpertArtifact::open(entry->directory, /*verify_checksums=*/true, ShardMemory::Resident, &spares));
      }
      const std::uint64_t bytes = host_bytes(artifact->shard_sizes());
      if (bytes != entry->bytes)
        throw Error("expert '" + entry->name + "' at " + entry->directory + " now takes " + std::to_string(bytes) +
                    " bytes, " + std::to_string(entry->bytes) +
                    " when it was added (replaced on disk since); remove it and add it again");
      expert = std::make_shared<const ExpertTensors>(artifact);
    } catch (...) {
      error = std::current_exception();
      expert.reset();
    }
    artifact.reset();  // the expert's tensors hold it
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      const bool seen = entry->loading->waiters > 0;
      finish_load(*entry, error);
      if (error) {
        state_->used -= entry->bytes;
        ++state_->counters.load_failures;
        if (background && !seen) entry->failed = error;
        // The waiters own the error now. Dropping this thread's reference under the lock
        // orders it before theirs (the exception's reference count is invisible to TSan).
        if (background) error = nullptr;
      } else {
        if (verified) {
          entry->verified = expert->artifact().record();
          ++state_->counters.verified_loads;
        }
        state_->counters.recycled_buffers += expert->artifact().recycled_buffers();
        entry->expert = std::move(expert);
        entry->last_used = ++state_->clock;
        ++state_->counters.loads;
        state_->counters.load_seconds += seconds;
        ++entry->loads;
        entry->load_seconds += seconds;
        if (!background) ++entry->holders;
      }
    }
    state_->changed.notify_all();
    if (error && !background) std::rethrow_exception(error);
  }

  void run_background_loads() {
    for (;;) {
      std::shared_ptr<Entry> entry;
      std::vector<std::shared_ptr<const ExpertTensors>> evicted;
      {
        std::unique_lock<std::mutex> lock(state_->mutex);
        state_->changed.wait(lock, [&] { return state_->stopping || !state_->queue.empty(); });
        if (state_->stopping) return;
        entry = std::move(state_->queue.front());
        state_->queue.pop_front();
        entry->queued = false;
        if (!entry->expert && !entry->loading) {
          try {
            evicted = reserve(*entry);
          } catch (const Error&) {  // no room now: a prefetch is a hint, the next acquire tries itself
            ++state_->counters.prefetches_skipped;
            entry.reset();
          }
        } else {
          entry.reset();  // an acquire loaded it meanwhile
        }
      }
      state_->changed.notify_all();  // wait() of this expert: it left the queue
      if (entry) load(entry, std::move(evicted), /*background=*/true);
    }
  }

  std::shared_ptr<State> state_;
  SafetensorsCheckpoint base_;
  nlohmann::json fingerprint_;
  std::thread worker_;
};

}  // namespace meswitch
