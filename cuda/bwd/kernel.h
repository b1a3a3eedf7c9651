// The backward main kernel: one CTA per (key block, query head, batch), with a producer
// warpgroup (TMA loads; the dQ writers) and two consumer warpgroups that keep dK and dV in
// registers while walking the query tiles.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "bwd/epilogue.h"
#include "bwd/mainloop.h"
#include "bwd/producer.h"
#include "bwd/query_blocks.h"
#include "common/mask.h"

namespace jax_fa3 {

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Storage = typename Traits::SharedStorage;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);
  int const warp = cutlass::canonical_warp_idx_sync();
  int const warpgroup = cutlass::canonical_warp_group_idx();
  int const n_block = p.dq_descending ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // see dq_descending
  int const head = blockIdx.y, batch = blockIdx.z;

  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_dout.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    TmaRing<Traits::kStages>::init(smem.qdo_ring, Traits::kConsumerWarpgroups);
    cutlass::arch::ClusterTransactionBarrier::init(&smem.kv_full, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  QueryBlocks<Traits::kBlockM, Traits::kBlockN> const blocks(
      n_block, used_length(p.seqused_q, batch, p.seqlen_q), used_length(p.seqused_k, batch, p.seqlen_k),
      p.window_left, p.window_right, p.diagonal_offset);

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (warp == 0) {
      BwdLoader<Traits>{p, smem, bool(cute::elect_one_sync())}.run(head, batch, blocks);
    } else if (warp <= Traits::kConsumerWarpgroups) {
      if constexpr (!Traits::kDQAtomics) { BwdDQWriter<Traits>{p, smem, warp - 1}.run(head, batch, blocks); }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    int const thread_idx = threadIdx.x - 128;
    Tensor acc_dk = partition_fragment_C(typename Traits::TiledMmaKV{},
                                         Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{});
    Tensor acc_dv = partition_fragment_C(typename Traits::TiledMmaKV{},
                                         Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{});
    BwdMainloop<Traits>{p, smem, thread_idx}.run(head, batch, blocks, acc_dk, acc_dv);
    BwdEpilogue<Traits>{p, thread_idx}.store(n_block, head, batch, acc_dk, acc_dv);
  }
}

}  // namespace jax_fa3
