// The key blocks a forward query tile visits and which of them need the mask: by the
// window rule, or as planned for packed sequences. The producer and the consumers ask
// the same question here, so they agree on every tile.
#pragma once

#include <cstdint>

#include "common/block_ranges.h"
#include "common/tile_scheduler.h"

namespace jax_fa3 {

// Packed sequences: a planned tile (jax_fa3/segments.py, forward_tiles), cut at documents.
// Its queries are rows [row_begin, row_end) of its batch row, and its key block n holds the
// keys from key_offset + n * kBlockN, so that a document's tiles and blocks line up with it.
template <int kBlockM, int kBlockN>
struct PlannedTile {
  int batch, row_begin, row_end, key_offset;
  KeyBlockRange<kBlockM, kBlockN> blocks;
};

// How many tiles the plan holds (its first entry), at most its capacity.
template <class Params>
__device__ __forceinline__ int planned_tiles(Params const& p) {
  return min(__ldg(p.tile_plan).x, p.plan_capacity);
}

// Tile `tile.m_block` of the plan: entries of two int4, {batch, row_begin, row_end,
// key_offset} and {n_blocks, right_masked, left_masked, 0}, after the header's two.
// An entry out of range (its batch row, or rows outside [0, seqlen_q)) comes back empty (no
// rows, no blocks), so a malformed plan writes nothing.
template <class Traits>
__device__ __forceinline__ PlannedTile<Traits::kBlockM, Traits::kBlockN> planned_tile(
    typename Traits::Params const& p, QueryTile const& tile) {
  int4 const* const entry = p.tile_plan + 2 * (int64_t(tile.m_block) + 1);
  int4 const where = __ldg(entry);
  int4 const blocks = __ldg(entry + 1);
  if (where.x < 0 || where.x >= p.batch || where.y < 0 || where.y > where.z || where.z > p.seqlen_q) {
    return {0, 0, 0, 0, {0, 0, 0, 0}};
  }
  return {where.x, where.y, where.z, where.w, {0, blocks.x, blocks.y, blocks.z}};
}

template <class Traits>
__device__ __forceinline__ KeyBlockRange<Traits::kBlockM, Traits::kBlockN> key_blocks(
    typename Traits::Params const& p, QueryTile const& tile, int seqlen_q, int seqlen_k) {
  static_assert(!Traits::kHasSegments, "packed sequences: planned_tile");
  return {tile.m_block, seqlen_q, seqlen_k, p.window_left, p.window_right, p.diagonal_offset};
}

}  // namespace jax_fa3
