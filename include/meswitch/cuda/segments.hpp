// The segment table of a mixed batch on the GPU: which tokens each expert owns, as
// blocks of work for the delta GEMM, built on the device from per-token expert ids.
//
// A batch's tokens need not be sorted: `order` lists them bucket by bucket (expert 0's
// tokens, expert 1's, ..., then the tokens with an id >= experts), and each work item is
// one block of up to tokens_per_block consecutive entries of `order` of one bucket:
//
//   expert ids    [ 1, 0, 1, -1, 1, 5 ]           experts = 2, tokens_per_block = 8
//   order         [ 1 | 0, 2, 4 | 5 ]              (token 3, id -1, has no delta)
//   items         {e 0, begin 0, n 1} {e 1, begin 1, n 3} {poison, begin 4, n 1} {none} ...
//
// An id < 0 means "base only": the token is in no bucket and no kernel touches its row.
// An id >= experts cannot raise on the device, so its output row is set to NaN (the
// poison bucket): a wrong id is loud, never a silently missing delta. Items past the
// last real one are `none`; the GEMM launches `capacity` blocks and those return at once.
// Because the table is built from ids on the device, a batch needs no host sync, and one
// table serves every linear of a forward.
#pragma once

#include <cstdint>
#include <string>

#include "meswitch/cuda/host_device.hpp"
#include "meswitch/error.hpp"

#if defined(__CUDACC__) || defined(MESWITCH_CUDA_RUNTIME)
#include <cuda_runtime_api.h>
#endif

namespace meswitch::cuda {

struct WorkItem {
  std::int32_t expert;  // 0..experts-1, kPoisonItem or kNoItem
  std::int32_t begin;   // first entry of `order`
  std::int32_t count;   // 1..tokens_per_block (0 for kNoItem)
  std::int32_t unused;  // keeps the item 16 bytes: one load
};

inline constexpr std::int32_t kNoItem = -1;
inline constexpr std::int32_t kPoisonItem = -2;
// Experts of one batch (the table keeps a counter per expert in shared memory).
inline constexpr int kMaxSegmentExperts = 1024;
// The GEMM's grid holds one block row per item.
inline constexpr std::int64_t kMaxWorkItems = 65535;

// Tokens per work item: the kernel's n-extent (8, 16 or 32 tokens: one, two or four
// mma n-tiles), chosen from the batch size so a decode batch does not pay for 32.
MESWITCH_HOST_DEVICE int tokens_per_block_for(std::int64_t tokens) { return tokens <= 8 ? 8 : tokens <= 16 ? 16 : 32; }

// Items enough for any split of `tokens` into experts + 1 buckets:
// sum_b ceil(n_b / B) <= tokens / B + buckets.
MESWITCH_HOST_DEVICE std::int64_t work_item_capacity(std::int64_t tokens, int experts) {
  const int per_block = tokens_per_block_for(tokens);
  return (tokens + per_block - 1) / per_block + experts + 1;
}

// Bucket of an expert id: the expert itself, `experts` (poison) for ids past the last, -1 for none.
MESWITCH_HOST_DEVICE int bucket_of(std::int32_t id, int experts) { return id < 0 ? -1 : id < experts ? id : experts; }

// Item `index` given, per bucket b (of `buckets`), its first entry of order starts[b]
// (starts[buckets] = entries in all) and its first item first_item[b]
// (first_item[buckets] = items in all).
MESWITCH_HOST_DEVICE WorkItem work_item_at(std::int64_t index, const std::int32_t* starts, const std::int32_t* first_item,
                                           int buckets, int per_block) {
  if (index >= first_item[buckets]) return {kNoItem, 0, 0, 0};
  // the last bucket whose first item is <= index (an empty bucket shares its first item
  // with the next one, so the search lands on a bucket that has items)
  int low = 0, high = buckets - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (first_item[middle] <= index) low = middle;
    else high = middle - 1;
  }
  const std::int32_t block = std::int32_t(index - first_item[low]);
  const std::int32_t begin = starts[low] + block * per_block;
  const std::int32_t left = starts[low + 1] - begin;
  return {low == buckets - 1 ? kPoisonItem : low, begin, left < per_block ? left : per_block, 0};
}

// starts and first_item from the per-bucket counts (one thread runs it on the device).
MESWITCH_HOST_DEVICE void scan_buckets(const std::int32_t* counts, int buckets, int per_block, std::int32_t* starts,
                                       std::int32_t* first_item) {
  std::int32_t entry = 0, item = 0;
  for (int b = 0; b < buckets; ++b) {
    starts[b] = entry;
    first_item[b] = item;
    entry += counts[b];
    item += (counts[b] + per_block - 1) / per_block;
  }
  starts[buckets] = entry;
  first_item[buckets] = item;
}

// Checks the sizes a table is built for (host side, before anything is launched).
inline void check_segment_sizes(std::int64_t tokens, int experts) {
  if (tokens < 0) throw Error("segment table: negative token count " + std::to_string(tokens));
  if (experts < 1 || experts > kMaxSegmentExperts)
    throw Error("segment table: " + std::to_string(experts) + " experts, expected 1.." +
                std::to_string(kMaxSegmentExperts));
  if (work_item_capacity(tokens, experts) > kMaxWorkItems)
    throw Error("segment table: " + std::to_string(tokens) + " tokens over " + std::to_string(experts) +
                " experts need " + std::to_string(work_item_capacity(tokens, experts)) + " work items, more than " +
                std::to_string(kMaxWorkItems) + "; split the batch");
}

// Device pointers of a built table.
struct SegmentTableView {
  std::int64_t tokens = 0;
  int experts = 0;
  const std::int32_t* order = nullptr;  // [tokens]; entries past the bucketed tokens are unused
  const WorkItem* items = nullptr;      // [work_item_capacity(tokens, experts)]

  int tokens_per_block() const { return tokens_per_block_for(tokens); }
  std::int64_t capacity() const { return work_item_capacity(tokens, experts); }
};

#if defined(__CUDACC__) || defined(MESWITCH_CUDA_RUNTIME)
// Builds the table of `tokens` expert ids (device memory, int32) into `order`
// ([tokens] int32) and `items` ([work_item_capacity] WorkItem), asynchronously on `stream`.
// Throws meswitch::Error for bad sizes and cuda::CudaError for a failed launch.
void build_segments(const std::int32_t* expert_ids, std::int64_t tokens, int experts, std::int32_t* order,
                    WorkItem* items, cudaStream_t stream);
#endif

}  // namespace meswitch::cuda
