// Host side of the segment table: checks the sizes and enqueues the one-block build.
#include <string>

#include "meswitch/cuda/check.hpp"
#include "meswitch/cuda/segments.cuh"
#include "meswitch/cuda/segments.hpp"

namespace meswitch::cuda {

void build_segments(const std::int32_t* expert_ids, std::int64_t tokens, int experts, std::int32_t* order,
                    WorkItem* items, cudaStream_t stream) {
  check_segment_sizes(tokens, experts);
  if (items == nullptr || (tokens > 0 && (expert_ids == nullptr || order == nullptr)))
    throw Error("build_segments: expert ids, order or items is null");
  const std::int64_t capacity = work_item_capacity(tokens, experts);
  kernels::build_segments_kernel<<<1, kernels::kSegmentThreads, kernels::segment_shared_bytes(experts), stream>>>(
      expert_ids, int(tokens), experts, tokens_per_block_for(tokens), int(capacity), order, items);
  MESWITCH_CUDA_CHECK(cudaGetLastError(), "build_segments: " + std::to_string(tokens) + " tokens, " +
                                              std::to_string(experts) + " experts");
}

}  // namespace meswitch::cuda
