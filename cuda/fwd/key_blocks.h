// The key blocks a forward query tile visits and which of them need the mask: by the
// window rule, or as planned for packed sequences. The producer and the consumers ask
// the same question here, so they agree on every tile.
#pragma once

#include <cstdint>

#include "common/block_ranges.h"
#include "common/tile_scheduler.h"

namespace jax_fa3 {

template <class Traits>
__device__ __forceinline__ KeyBlockRange<Traits::kBlockM, Traits::kBlockN> key_blocks(
    typename Traits::Params const& p, QueryTile const& tile, int seqlen_q, int seqlen_k) {
  if constexpr (Traits::kHasSegments) {
    int4 const plan = __ldg(p.tile_plan + int64_t(tile.batch) * p.num_m_blocks + tile.m_block);
    return {plan.x, plan.y, plan.z, plan.w};
  } else {
    return {tile.m_block, seqlen_q, seqlen_k, p.window_left, p.window_right, p.diagonal_offset};
  }
}

}  // namespace jax_fa3
