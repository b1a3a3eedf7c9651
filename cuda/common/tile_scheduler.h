// Persistent tile schedulers: one CTA per SM walks a sequence of (m_block, head, batch)
// query tiles. Both give the producer warp and the consumer warpgroups the same sequence.
#pragma once

#include "common/barriers.h"

namespace jax_fa3 {

struct QueryTile {
  int m_block, head, batch;
};

// Static round-robin in the order m_block (fastest), head, batch, so the CTAs running at
// the same time share one head's K and V in L2. For uniform work (no mask window), at the
// head dims whose tile table row does not ask for the dynamic one (fwd/config.h).
struct StaticTileScheduler {
  int num_m_blocks, heads, num_tiles;

  __device__ int first() const { return blockIdx.x; }
  __device__ QueryTile decode(int tile) const {
    int const bh = tile / num_m_blocks;
    return {tile % num_m_blocks, bh % heads, bh / heads};
  }
  __device__ int producer_next(int tile) { return tile + gridDim.x; }
  __device__ void producer_finish() {}
  __device__ int consumer_next(int tile) { return tile + gridDim.x; }
  __device__ QueryTile consumer_tile(int tile) const { return decode(tile); }
};

// Dynamic longest-first order for masked (causal, local) attention, whose tiles differ
// in cost, and for uniform tiles where it measured faster (fwd/config.h). Heads are taken
// in L2-sized sections; inside a section the most expensive m_blocks of every head go
// first. Each CTA's next tile comes from a global counter (zeroed on-stream before every
// launch); the producer warp takes it and hands it to the consumers through shared memory,
// decoded, so that the divisions of decode() stay off the consumers' path between tiles.
template <int kConsumerThreads>
struct DynamicTileScheduler {
  int num_m_blocks, heads, num_tiles, heads_per_section;
  int total_heads;  // batch * heads
  int* counter;     // global
  int4* slot;       // shared: the next tile's index, m_block, head and batch
  int published = 0;
  QueryTile handed{-1, 0, 0};  // consumers: the last tile received (m_block -1: none yet)

  static constexpr int kBarrierThreads = 32 + kConsumerThreads;  // the producer warp + consumers

  __device__ int first() const { return blockIdx.x; }

  __device__ QueryTile decode(int tile) const {
    int const tiles_per_section = num_m_blocks * heads_per_section;
    int const section = tile / tiles_per_section;
    int const in_section = tile % tiles_per_section;
    int const section_heads = min(heads_per_section, total_heads - section * heads_per_section);
    int const bh = section * heads_per_section + in_section % section_heads;
    int const m_block = num_m_blocks - 1 - in_section / section_heads;
    return {m_block, bh % heads, bh / heads};
  }

  // Producer warp, all lanes: claims the next tile and publishes it.
  __device__ int producer_next(int /*tile*/) {
    int next = 0;
    if (threadIdx.x % 32 == 0) { next = atomicAdd(counter, 1) + gridDim.x; }
    next = __shfl_sync(0xffffffff, next, 0);
    // Wait until the consumers have read the previous value before overwriting it.
    if (published > 0) { barrier_sync(Barrier::kSchedulerEmpty, kBarrierThreads); }
    if (threadIdx.x % 32 == 0) {
      QueryTile const tile = next < num_tiles ? decode(next) : QueryTile{0, 0, 0};
      *slot = make_int4(next, tile.m_block, tile.head, tile.batch);
    }
    barrier_arrive(Barrier::kSchedulerFull, kBarrierThreads);
    ++published;
    return next;
  }

  // Matches the consumers' last "read" arrival so no barrier is left half-complete.
  __device__ void producer_finish() {
    if (published > 0) { barrier_sync(Barrier::kSchedulerEmpty, kBarrierThreads); }
  }

  __device__ int consumer_next(int /*tile*/) {
    barrier_sync(Barrier::kSchedulerFull, kBarrierThreads);
    int4 const next = *slot;
    barrier_arrive(Barrier::kSchedulerEmpty, kBarrierThreads);
    handed = {next.y, next.z, next.w};
    return next.x;
  }

  // The consumers' tile: the first one decoded here, the others as the producer decoded them.
  __device__ QueryTile consumer_tile(int tile) const { return handed.m_block < 0 ? decode(tile) : handed; }
};

}  // namespace jax_fa3
