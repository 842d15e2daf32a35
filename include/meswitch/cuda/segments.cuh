// Building the segment table (segments.hpp) on the device: one block counts the tokens of
// each expert, scans the counts, places every token in its expert's run of `order` and
// writes the work items. A batch is at most a few thousand tokens and a table is built
// once per forward, so one block of 1024 threads with shared-memory counters is plenty,
// and nothing comes back to the host.
//
// The order of tokens within an expert's run depends on which thread's atomic lands first;
// no output depends on it (each token's row is computed from its own activations alone).
#pragma once

#include <cstdint>

#include "meswitch/cuda/segments.hpp"

namespace meswitch::cuda::kernels {

inline constexpr int kSegmentThreads = 1024;

// Shared memory: counts and cursors [buckets], starts and first items [buckets + 1].
inline std::size_t segment_shared_bytes(int experts) { return std::size_t(4 * (experts + 1) + 2) * sizeof(std::int32_t); }

__global__ void __launch_bounds__(kSegmentThreads)
    build_segments_kernel(const std::int32_t* expert_ids, int tokens, int experts, int per_block, int capacity,
                          std::int32_t* order, WorkItem* items) {
  extern __shared__ std::int32_t shared[];
  const int buckets = experts + 1;
  std::int32_t* counts = shared;
  std::int32_t* cursor = counts + buckets;
  std::int32_t* starts = cursor + buckets;
  std::int32_t* first_item = starts + buckets + 1;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < tokens; t += blockDim.x) {
    const int bucket = bucket_of(expert_ids[t], experts);
    if (bucket >= 0) atomicAdd(&counts[bucket], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) scan_buckets(counts, buckets, per_block, starts, first_item);
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) cursor[b] = starts[b];
  __syncthreads();
  for (int t = threadIdx.x; t < tokens; t += blockDim.x) {
    const int bucket = bucket_of(expert_ids[t], experts);
    if (bucket >= 0) order[atomicAdd(&cursor[bucket], 1)] = t;
  }
  for (int i = threadIdx.x; i < capacity; i += blockDim.x)
    items[i] = work_item_at(i, starts, first_item, buckets, per_block);
}

}  // namespace meswitch::cuda::kernels
