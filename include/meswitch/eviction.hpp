// The one eviction rule of every tier that keeps experts within a byte budget: the
// store's host tier (store.hpp) and the device tier of CUDA builds (kept beside the store,
// which calls this same function through the bindings).
//
//   - An expert larger than the whole budget never fits: Error, naming both sizes.
//   - Otherwise the residents nobody uses (not held, pinned or loading) are evicted least
//     recently used first until the expert fits.
//   - When even evicting all of those would not make room, nothing is evicted and TierFull
//     names the expert, its bytes, the budget and every busy resident with why it is busy.
//     It is the one error that may pass: a later try, after a hold ends, can fit.
//
// Checking before evicting matters: a load that cannot fit leaves the tier as it was, so a
// refused expert never costs the others their residency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "meswitch/error.hpp"

namespace meswitch {

// No room now beside what is held, pinned or loading; may fit once a hold ends.
class TierFull : public Error {
 public:
  using Error::Error;
};

// One expert whose bytes a tier counts, as the rule sees it.
struct TierResident {
  std::string name;
  std::uint64_t bytes = 0;
  // Why it cannot be evicted now ("held", "pinned", "loading"), or empty when it can.
  std::string busy;
};

// Throws Error when `bytes` can never fit in the tier: more than its whole budget.
inline void check_fits_tier(const std::string& tier, const std::string& expert, std::uint64_t bytes,
                            std::uint64_t budget) {
  if (bytes > budget)
    throw Error("expert '" + expert + "' needs " + std::to_string(bytes) + " bytes of " + tier +
                " memory, more than the " + tier + " tier's whole budget of " + std::to_string(budget) + " bytes");
}

// The residents to evict (indices into `residents`, which are ordered least recently used
// first) so that `bytes` more fit in the tier's `budget` with `used` bytes counted now
// (residents and loads in flight). `tier` names the tier in messages ("host", "cuda:0").
inline std::vector<std::size_t> choose_evictions(const std::string& tier, const std::string& expert,
                                                 std::uint64_t bytes, std::uint64_t used, std::uint64_t budget,
                                                 const std::vector<TierResident>& residents) {
  check_fits_tier(tier, expert, bytes, budget);
  std::uint64_t evictable = 0;
  for (const TierResident& resident : residents)
    if (resident.busy.empty()) evictable += resident.bytes;
  const std::uint64_t busy_bytes = used > evictable ? used - evictable : 0;
  if (busy_bytes + bytes > budget) {
    std::string busy;
    for (const TierResident& resident : residents)
      if (!resident.busy.empty())
        busy += (busy.empty() ? "" : ", ") + resident.name + " (" + std::to_string(resident.bytes) + " bytes, " +
                resident.busy + ")";
    throw TierFull("cannot load expert '" + expert + "' (" + std::to_string(bytes) + " bytes): the " + tier +
                   " tier's budget is " + std::to_string(budget) + " bytes and " + std::to_string(busy_bytes) +
                   " of them are held, pinned or loading: " + busy);
  }
  std::vector<std::size_t> victims;
  for (std::size_t i = 0; i < residents.size() && used + bytes > budget; ++i) {
    if (!residents[i].busy.empty()) continue;
    victims.push_back(i);
    used -= residents[i].bytes;
  }
  return victims;
}

}  // namespace meswitch
