// The backward producer warpgroup: warp 0 loads K and V once and Q, dO per query tile
// through a stage ring; warps 1 and 2 add each tile's dQ into the float32 accumulator in
// global memory with bulk reduce-adds, one warp per consumer warpgroup (in a fixed order
// when deterministic).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "bwd/query_blocks.h"
#include "common/barriers.h"
#include "common/ptx.h"

namespace jax_fa3 {

using namespace cute;

// `add()` on every consumer thread; when `ordered` (deterministic mode), in this CTA's turn
// on `semaphore`: thread 0 waits for the count to reach `turn`, all threads add, and the
// count moves on once every thread's additions are visible to the next CTA.
template <int kConsumerThreads, class Add>
__device__ __forceinline__ void consumers_add_in_turn(bool ordered, int* semaphore, int turn, int thread_idx,
                                                      Add&& add) {
  if (ordered) {
    if (thread_idx == 0) {
      while (load_acquire(semaphore) != turn) {}
    }
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
  }
  add();
  if (ordered) {
    __threadfence();
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
    if (thread_idx == 0) { atomicAdd(semaphore, 1); }
  }
}

template <class Traits>
struct BwdLoader {
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;

  Params const& p;
  Storage& smem;
  bool const leader;
  TmaRing<Traits::kStages> ring{smem.qdo_ring};
  typename TmaRing<Traits::kStages>::Position position;  // carries over from tile to tile

  // The CTA's tile_index-th tile (see KeyTileOrder).
  __device__ void run(int head, int batch, typename Traits::Blocks const& blocks, int tile_index) {
    int const kv_head = head / p.kv_group;
    auto kv_shape = make_shape(p.seqlen_k, int(kHeadDim), p.kv_heads, p.batch);
    auto q_shape = make_shape(p.seqlen_q, int(kHeadDim), p.heads, p.batch);
    Tensor gK = local_tile(p.tma_k.get_tma_tensor(kv_shape)(_, _, kv_head, batch),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(blocks.n_block, _0{}));
    Tensor gV = local_tile(p.tma_v.get_tma_tensor(kv_shape)(_, _, kv_head, batch),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(blocks.n_block, _0{}));
    Tensor gQ = local_tile(p.tma_q.get_tma_tensor(q_shape)(_, _, head, batch),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (M, D, m)
    Tensor gdO = local_tile(p.tma_dout.get_tma_tensor(q_shape)(_, _, head, batch),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutK{});
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
    auto k_parts = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto v_parts = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    auto q_parts = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto do_parts = tma_partition(p.tma_dout, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
    Tensor tKg = get<0>(k_parts);
    Tensor tKs = get<1>(k_parts);
    Tensor tVg = get<0>(v_parts);
    Tensor tVs = get<1>(v_parts);
    Tensor tQg = get<0>(q_parts);
    Tensor tQs = get<1>(q_parts);
    Tensor tdOg = get<0>(do_parts);
    Tensor tdOs = get<1>(do_parts);

    if (leader) {
      // The previous tile's K and V stay until both consumer warpgroups finished with them.
      if (tile_index > 0) { cutlass::arch::ClusterBarrier::wait(&smem.kv_empty, (tile_index - 1) & 1); }
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.kv_full, 2 * Traits::kBytesK);
      copy(p.tma_k.with(smem.kv_full, 0, TMA::CacheHintSm90::EVICT_FIRST), tKg, tKs);
      copy(p.tma_v.with(smem.kv_full, 0, TMA::CacheHintSm90::EVICT_FIRST), tVg, tVs);
    }
    int64_t const stats = (int64_t(batch) * p.heads + head) * p.seqlen_q_rounded;
    for (int m = blocks.m_begin; m < blocks.m_end; ++m) {
      if (!blocks.visits(m)) { continue; }
      if (leader) {
        // Q and dO are re-read by every key block of the head: keep them in L2.
        uint64_t& full = ring.acquire(position, 2 * Traits::kBytesQ + 2 * Traits::kBytesStats);
        copy(p.tma_q.with(full, 0, TMA::CacheHintSm90::EVICT_LAST), tQg(_, m), tQs(_, position.stage));
        copy(p.tma_dout.with(full, 0, TMA::CacheHintSm90::EVICT_LAST), tdOg(_, m), tdOs(_, position.stage));
        int64_t const row = stats + m * kBlockM;
        bulk_load(smem.lse_log2[position.stage], p.lse_log2 + row, Traits::kBytesStats, full);
        bulk_load(smem.dpsum[position.stage], p.dpsum + row, Traits::kBytesStats, full);
      }
      position.advance();
    }
  }
};

// One writer warp per consumer warpgroup: it adds that warpgroup's part of each step's dQ
// (see dq_index), so neither warpgroup waits for the other's dQ.
template <class Traits>
struct BwdDQWriter {
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kBarrierThreads = Traits::kDQWriterBarrierThreads;
  static constexpr int kPartFloats = Traits::kDQFloats / Traits::kConsumerWarpgroups;

  Params const& p;
  Storage& smem;
  int const warpgroup;  // the consumer warpgroup this warp serves

  __device__ void run(int head, int batch, typename Traits::Blocks const& blocks) {
    bool const lane0 = threadIdx.x % 32 == 0;
    int64_t const head_blocks = (int64_t(batch) * p.heads + head) * p.num_m_blocks;
    float const* const part = smem.dq.data.data() + warpgroup * kPartFloats;
    for (int m = blocks.m_begin; m < blocks.m_end; ++m) {
      if (!blocks.visits(m)) { continue; }
      barrier_sync(Barrier::kDQFull, kBarrierThreads, warpgroup);
      if (lane0) {
        int* const semaphore = p.dq_semaphore + head_blocks + m;
        // Deterministic: key blocks add into a query tile in a fixed order. Each adds one
        // part per writer, so block `turn` goes once the count reaches turn * writers: every
        // earlier block has then added all its parts (and no later block any).
        int const turn = blocks.dq_turn(m, p.dq_descending);
        if (p.deterministic) {
          while (load_acquire(semaphore) < turn * Traits::kConsumerWarpgroups) {}
        }
        bulk_reduce_add_f32(p.dq_accum + (head_blocks + m) * Traits::kDQFloats + warpgroup * kPartFloats, part,
                            kPartFloats * sizeof(float));
        if (p.deterministic) {
          // The add must have landed in global memory before the next block's turn.
          bulk_wait_all();
          __threadfence();
          atomicAdd(semaphore, 1);
        } else {
          bulk_wait_all_read();  // shared memory reusable
        }
      }
      __syncwarp();
      // Matched by the warpgroup's wait before its next hand-off, or at its finish().
      barrier_arrive(Barrier::kDQEmpty, kBarrierThreads, warpgroup);
    }
  }

  __device__ void finish() {
    if (threadIdx.x % 32 == 0) { bulk_wait_all(); }
  }
};

}  // namespace jax_fa3
