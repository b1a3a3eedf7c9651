// The backward's tiles, (key block, query head, batch), and their order. Persistent runs
// (see run_bwd) launch min(tiles, SMs) CTAs, each walking tiles blockIdx.x, blockIdx.x +
// gridDim.x, ...: while a CTA's consumers write one tile's dK and dV, its producer already
// loads the next tile's K, V and Q/dO, which hides the per-tile start-up (it weighs most
// at short sequences, where a tile has few query steps). Otherwise one CTA per tile.
//
// Order: key block fastest, then head, then batch. The key blocks that add into one query
// tile's dQ in turn (deterministic mode), and the heads of one GQA group that add into
// one dK/dV, come in increasing tile order, and every CTA takes its tiles in increasing
// order: a tile only ever waits for tiles earlier in that order, which are running or
// done, so the waits cannot deadlock.
#pragma once

#include <cstdint>

#include "bwd/query_blocks.h"

namespace jax_fa3 {

struct KeyTile {
  int n_block, head, batch;
};

struct KeyTileOrder {
  int num_n_blocks, heads, num_tiles;
  bool descending;  // key blocks from the last down (see BwdTraits::Params::dq_descending)

  __device__ KeyTile operator()(int tile) const {
    int const x = tile % num_n_blocks, head_batch = tile / num_n_blocks;
    return {descending ? num_n_blocks - 1 - x : x, head_batch % heads, head_batch / heads};
  }
};

// The query blocks a tile visits: by the window rule, or as planned for packed sequences.
// The loader, the dQ writers and the consumers all walk these.
template <class Traits>
__device__ __forceinline__ typename Traits::Blocks query_blocks(typename Traits::Params const& p, KeyTile const& tile) {
  if constexpr (Traits::kHasSegments) {
    int2 const queries = __ldg(p.key_block_plan + int64_t(tile.batch) * p.num_n_blocks + tile.n_block);
    // Clamped: the plan indexes the dQ accumulator.
    return {tile.n_block, max(queries.x, 0), min(queries.y, p.num_m_blocks),
            p.query_tile_plan + int64_t(tile.batch) * p.num_m_blocks};
  } else {
    return {tile.n_block, used_length(p.seqused_q, tile.batch, p.seqlen_q),
            used_length(p.seqused_k, tile.batch, p.seqlen_k), p.window_left, p.window_right, p.diagonal_offset};
  }
}

}  // namespace jax_fa3
