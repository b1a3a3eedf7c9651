// The backward main kernel: persistent CTAs over (key block, query head, batch) tiles
// (see KeyTileOrder), each with a producer warpgroup (TMA loads; the dQ writers) and two
// consumer warpgroups that keep a tile's dK and dV in registers while walking its query
// tiles.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "bwd/epilogue.h"
#include "bwd/key_tiles.h"
#include "bwd/mainloop.h"
#include "bwd/producer.h"
#include "common/mask.h"

namespace jax_fa3 {

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Storage = typename Traits::SharedStorage;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);
  int const warp = cutlass::canonical_warp_idx_sync();
  int const warpgroup = cutlass::canonical_warp_group_idx();

  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_dout.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    TmaRing<Traits::kStages>::init(smem.qdo_ring, Traits::kConsumerWarpgroups);
    cutlass::arch::ClusterTransactionBarrier::init(&smem.kv_full, 1);
    cutlass::arch::ClusterBarrier::init(&smem.kv_empty, Traits::kConsumerWarpgroups);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  KeyTileOrder const order{p.num_n_blocks, p.heads, p.num_tiles, p.dq_descending};
  // Calls f(tile, blocks, i) for the CTA's i-th tile: every gridDim.x-th tile, or only
  // tile blockIdx.x where the grid covers them all (see run_bwd).
  auto for_each_tile = [&](auto&& f) {
    auto visit = [&](int t, int i) {
      KeyTile const tile = order(t);
      f(tile, query_blocks<Traits>(p, tile), i);
    };
    if constexpr (Traits::kPersistent) {
      for (int t = blockIdx.x, i = 0; t < p.num_tiles; t += gridDim.x, ++i) { visit(t, i); }
    } else {
      visit(blockIdx.x, 0);
    }
  };

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (warp == 0) {
      BwdLoader<Traits> loader{p, smem, bool(cute::elect_one_sync())};
      for_each_tile([&](KeyTile tile, auto const& blocks, int i) { loader.run(tile.head, tile.batch, blocks, i); });
    } else if (warp <= Traits::kConsumerWarpgroups) {
      if constexpr (!Traits::kDQAtomics) {
        BwdDQWriter<Traits> writer{p, smem, warp - 1};
        for_each_tile([&](KeyTile tile, auto const& blocks, int) { writer.run(tile.head, tile.batch, blocks); });
        writer.finish();
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    int const thread_idx = threadIdx.x - 128;
    BwdMainloop<Traits> mainloop{p, smem, thread_idx};
    for_each_tile([&](KeyTile tile, auto const& blocks, int i) {
      Tensor acc_dk = partition_fragment_C(typename Traits::TiledMmaKV{},
                                           Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{});
      Tensor acc_dv = partition_fragment_C(typename Traits::TiledMmaKV{},
                                           Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{});
      mainloop.run(tile.head, tile.batch, blocks, acc_dk, acc_dv, i);
      BwdEpilogue<Traits>{p, smem, thread_idx}.store(tile.n_block, tile.head, tile.batch, acc_dk, acc_dv);
    });
    mainloop.finish();
  }
}

}  // namespace jax_fa3
