// The forward kernel: one persistent CTA per SM with a producer warpgroup (TMA) and
// two or three consumer warpgroups (WGMMA + softmax), registers moved to the consumers.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "common/barriers.h"
#include "common/tile_scheduler.h"
#include "fwd/epilogue.h"
#include "fwd/key_blocks.h"
#include "fwd/mainloop.h"
#include "fwd/producer.h"
#include "fwd/transpose_v.h"

namespace jax_fa3 {

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) fwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Storage = typename Traits::SharedStorage;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);

  int const warp = cutlass::canonical_warp_idx_sync();
  int const warpgroup = cutlass::canonical_warp_group_idx();

  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_o.get_tma_descriptor());
    TmaRing<Traits::kStages>::init(smem.k_ring, Traits::kConsumerWarpgroups);
    if constexpr (Traits::kFp8) {  // V loads go to the transposing warps, V^T to the consumers
      TmaRing<Traits::kStages>::init(smem.v_ring, 1);
      TmaRing<Traits::kStages>::init(smem.transposed.vt_ring, Traits::kConsumerWarpgroups);
      cutlass::arch::ClusterBarrier::init(&smem.transposed.v_done, 1);
    } else {
      TmaRing<Traits::kStages>::init(smem.v_ring, Traits::kConsumerWarpgroups);
    }
    cutlass::arch::ClusterTransactionBarrier::init(&smem.q_full, 1);
    cutlass::arch::ClusterBarrier::init(&smem.q_empty, Traits::kConsumerWarpgroups);
    cutlass::arch::ClusterBarrier::init(&smem.o_free, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  using Scheduler = std::conditional_t<Traits::kDynamicScheduler, DynamicTileScheduler<Traits::kConsumerThreads>,
                                       StaticTileScheduler>;
  Scheduler scheduler;
  if constexpr (Traits::kHasSegments) {  // the plan's tiles, each with its batch row, times the heads
    int const tiles = planned_tiles(p);
    scheduler = Scheduler{tiles, p.heads, tiles * p.heads, min(p.heads_per_l2_section, p.heads), p.heads,
                          p.tile_counter, &smem.next_tile};
  } else if constexpr (Traits::kDynamicScheduler) {
    scheduler = Scheduler{p.num_m_blocks, p.heads, p.num_tiles, p.heads_per_l2_section, p.batch * p.heads,
                          p.tile_counter, &smem.next_tile};
  } else {
    scheduler = Scheduler{p.num_m_blocks, p.heads, p.num_tiles};
  }

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (warp == 0) {  // one warp issues every load; the other three retire (16-bit) or transpose V (FP8)
      FwdProducer<Traits> producer{p, smem, bool(cute::elect_one_sync())};
      producer.run(scheduler);
    } else if constexpr (Traits::kFp8) {
      VTransposer<Traits> transposer{smem, int(threadIdx.x) - 32};
      transposer.run();
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    int const thread_idx = threadIdx.x - 128;
    FwdMainloop<Traits> mainloop{p, smem, thread_idx, warpgroup - 1};
    FwdEpilogue<Traits> epilogue{p, smem, thread_idx};
    int rows[FwdMainloop<Traits>::kRows];
    mainloop.rows_in_tile(rows);
    mainloop.init_turns();
    if constexpr (Traits::kHasSegments) {
      for (int tile_index = scheduler.first(); tile_index < scheduler.num_tiles;) {
        QueryTile tile = scheduler.consumer_tile(tile_index);
        auto const planned = planned_tile<Traits>(p, tile);
        tile.batch = planned.batch;
        if (planned.blocks.empty()) {
          epilogue.store_empty(tile, planned.row_begin, planned.row_end, p.seqlen_q);
        } else {
          Tensor acc_o = partition_fragment_C(typename Traits::TiledMmaPV{},
                                              select<0, 1>(typename Traits::TileShapePV{}));
          float lse[FwdMainloop<Traits>::kRows];
          mainloop.compute(tile, planned, acc_o, lse, rows);
          epilogue.store_rows(tile, planned.row_begin, planned.row_end, acc_o, lse, rows);
        }
        tile_index = scheduler.consumer_next(tile_index);
      }
    } else {
      for (int tile_index = scheduler.first(); tile_index < p.num_tiles;) {
        QueryTile const tile = scheduler.consumer_tile(tile_index);
        int const seqlen_q = used_length(p.seqused_q, tile.batch, p.seqlen_q);
        int const seqlen_k = used_length(p.seqused_k, tile.batch, p.seqlen_k);
        auto const range = key_blocks<Traits>(p, tile, seqlen_q, seqlen_k);
        if (range.empty()) {
          epilogue.store_empty(tile, seqlen_q);
        } else {
          Tensor acc_o = partition_fragment_C(typename Traits::TiledMmaPV{},
                                              select<0, 1>(typename Traits::TileShapePV{}));
          float lse[FwdMainloop<Traits>::kRows];
          mainloop.compute(tile, range, seqlen_q, seqlen_k, acc_o, lse, rows);
          if constexpr (Traits::kEarlyTileHandoff) {
            // The next tile's index before the store: the hand-off's barrier with the producer
            // warp then falls where the warpgroups meet anyway, not after the store's.
            tile_index = scheduler.consumer_next(tile_index);
            epilogue.store(tile, acc_o, lse, rows);
            continue;
          }
          epilogue.store(tile, acc_o, lse, rows);
        }
        tile_index = scheduler.consumer_next(tile_index);
      }
    }
    epilogue.finish();
  }
}

}  // namespace jax_fa3
