// The backward consumer warpgroups. Per query tile m, each warpgroup (its 64 keys, or its
// half of the queries when split by head dim):
//   S^T = K·Q^T, dP^T = V·dO^T            (SS WGMMA, issued together)
//   P^T = exp2(S^T·scale_log2 - lse_log2)  (masked on edge tiles; under dP's WGMMA)
//   dS^T = P^T ∘ (dP^T - dpsum)           (∘ (1 - tanh²) with a softcap)
//   dS^T -> shared memory
//   dV += P^T·dO                          (RS WGMMA, P^T from registers; under dS's hand-off)
//   dQ = dS·K                             (SS WGMMA across both warpgroups)
//   dK += dS^T·Q                          (RS WGMMA; under dQ's hand-off)
//   dQ -> shared memory for the warpgroup's writer warp and its bulk reduce-add.
// Split by head dim, P^T and dS^T both go through shared memory (every GEMM after them is
// SS) and dQ is added to global memory from registers.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "bwd/config.h"
#include "bwd/postprocess.h"
#include "bwd/producer.h"
#include "bwd/query_blocks.h"
#include "common/barriers.h"
#include "common/gemm.h"
#include "common/layouts.h"
#include "common/mask.h"
#include "common/segments.h"
#include "common/softmax.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct BwdMainloop {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  using Ring = TmaRing<Traits::kStages>;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kConsumerThreads = Traits::kConsumerThreads;
  static constexpr int kRows = 2;  // key rows of the 64-row WGMMA atom held by each thread

  Params const& p;
  Storage& smem;
  int const thread_idx;  // among the consumer threads
  Ring ring{smem.qdo_ring};
  typename Ring::Position position;  // both carry over from tile to tile
  int steps_done = 0;                // over all of the CTA's tiles: picks the dS buffer

  __device__ bool warpgroup_leader() const { return thread_idx % 128 == 0; }

  // The P^T tiles, which only the split by head dim has.
  __device__ Element* pt_data() {
    if constexpr (Traits::kSplitHeadDim) {
      return smem.p.data.data();
    } else {
      return nullptr;
    }
  }

  // The CTA's tile_index-th tile (see KeyTileOrder).
  template <class AccDK, class AccDV>
  __device__ void run(int head, int batch, typename Traits::Blocks const& blocks, AccDK& acc_dk,
                      AccDV& acc_dv, int tile_index) {
    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmaKV mma_kv;
    typename Traits::TiledMmaDQ mma_dq;
    auto thread_sdp = mma_sdp.get_thread_slice(thread_idx);
    auto thread_kv = mma_kv.get_thread_slice(thread_idx);
    auto thread_dq = mma_dq.get_thread_slice(thread_idx);

    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKt{});
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQt{});
    Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
    Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQt{});
    Tensor sdS = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDS{});
    Tensor sdSt = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDSt{});

    Tensor tSrK = thread_sdp.partition_fragment_A(sK);
    Tensor tSrV = thread_sdp.partition_fragment_A(sV);
    Tensor tSrQ = thread_sdp.partition_fragment_B(sQ);      // (MMA, N, K, stage)
    Tensor tSrdO = thread_sdp.partition_fragment_B(sdO);
    Tensor tKVrQt = thread_kv.partition_fragment_B(sQt);    // dK's B: Q^T
    Tensor tKVrdOt = thread_kv.partition_fragment_B(sdOt);  // dV's B: dO^T
    Tensor tDQrdS = thread_dq.partition_fragment_A(sdS);    // (MMA, M, K, buffer)
    Tensor tDQrKt = thread_dq.partition_fragment_B(sKt);
    auto ds_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_sdp);
    auto thread_ds_copy = ds_copy.get_thread_slice(thread_idx);
    Tensor tDSsdSt = thread_ds_copy.partition_D(sdSt);      // (CPY, CPY_N, CPY_M, buffer)

    auto const tile_coords = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor thread0_coords = mma_sdp.get_thread_slice(_0{}).partition_C(tile_coords);
    Tensor my_coords = thread_sdp.partition_C(tile_coords);
    Tensor my_rc = make_tensor(my_coords.data(), acc_rows_cols(my_coords.layout()));
    Tensor thread0_rc = make_tensor(thread0_coords.data(), acc_rows_cols(thread0_coords.layout()));
    int rows[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) { rows[r] = get<0>(my_rc(r, 0)); }
    int const column_offset = get<1>(my_rc(0, 0));
    constexpr int kCols = decltype(size<1>(thread0_rc))::value;

    // Packed sequences: each key row's visible queries; else the window rule.
    auto const mask = [&] {
      if constexpr (Traits::kHasSegments) {
        RowSpans<kRows> spans;
        spans.load(p.kv_rows + int64_t(batch) * p.seqlen_k, p.seqlen_k, int64_t(blocks.n_block) * kBlockN, rows);
        return spans;
      } else {
        return AttentionMask{blocks.seqlen_k, p.window_left, p.window_right, p.diagonal_offset};
      }
    }();

    clear(acc_dk);
    clear(acc_dv);
    cutlass::arch::ClusterTransactionBarrier::wait(&smem.kv_full, tile_index & 1);

    auto apply_mask = [&](auto& scores, int m, auto masked) {
      if constexpr (decltype(masked)::value) {
        if constexpr (Traits::kHasSegments) {
          mask.template apply<kBlockM>(scores, thread0_coords, int64_t(m) * kBlockM + column_offset,
                                       p.q_rows + int64_t(batch) * p.seqlen_q, p.seqlen_q);
        } else {
          mask.template apply_transposed<kBlockN, kBlockM>(scores, thread0_coords, rows, column_offset,
                                                           blocks.n_block, m);
        }
      }
    };

    // The tile's row statistics, staged with Q and dO, by this thread's columns. At head dim
    // 128 the lse goes to registers before the S/dP GEMMs are issued: loaded after, its
    // shared-memory reads queue behind the GEMMs' operand reads and stall the exponentials.
    // Elsewhere, and dP's sum everywhere, they are read at their use, as registers held
    // longer spill.
    static constexpr bool kPreloadLse = kHeadDim == 128;
    auto column_of = [&](int c) { return column_offset + get<1>(thread0_rc(0, c)); };

    // P^T = exp2(S^T·scale_log2 - lse_log2) in place of S^T and dS^T = P^T ∘ (dP^T - dpsum)
    // in place of dP^T, with both GEMMs awaited on either branch. Each branch ends with the
    // same WGMMA batches in flight, so that ptxas, which does not correlate branches, sees
    // no accumulator read under a running WGMMA.
    auto probabilities_and_ds = [&](auto& acc_s, auto& acc_dp, int m, auto masked, int stage, auto const& lse_log2) {
      Tensor s = make_tensor(acc_s.data(), acc_rows_cols(acc_s.layout()));
      Tensor dp = make_tensor(acc_dp.data(), acc_rows_cols(acc_dp.layout()));
      auto lse_at = [&](int c) {
        if constexpr (kPreloadLse) {
          return lse_log2(c);
        } else {
          return smem.lse_log2[stage][column_of(c)];
        }
      };
      auto dpsum_at = [&](int c) { return smem.dpsum[stage][column_of(c)]; };
      bool const softcap = Traits::kSoftcap == SoftcapMode::kRuntime ? p.softcap_prescale != 0.f
                                                                       : Traits::kSoftcap == SoftcapMode::kOn;
      if (!softcap) {
        // P^T once S^T is ready (dP^T still runs), then dS^T once dP^T is.
        warpgroup_wait<1>();
        apply_mask(acc_s, m, masked);
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; ++c) { s(r, c) = exp2f(s(r, c) * p.scale_log2 - lse_at(c)); }
        }
        float probability_sum = 0.f;  // depends on every exponential: keeps them ahead of the wait
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc_s); ++i) { probability_sum += acc_s(i); }
        finish_before_next_wait(probability_sum, p.num_m_blocks < 0, &smem.unused_sink);
        warpgroup_wait<0>();
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; ++c) { dp(r, c) = s(r, c) * (dp(r, c) - dpsum_at(c)); }
        }
      } else {
        // dS also needs tanh's derivative: both GEMMs are awaited first.
        warpgroup_wait<0>();
        apply_softcap(acc_s, p.softcap_prescale);
        apply_mask(acc_s, m, masked);
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < kCols; ++c) {
            float const t = s(r, c);
            float const prob = exp2f(t * p.scale_log2 - lse_at(c));
            s(r, c) = prob;
            dp(r, c) = prob > 0.f ? prob * (dp(r, c) - dpsum_at(c)) * (1.f - t * t) : 0.f;
          }
        }
      }
    };

    // The gradient GEMMs, one lambda per strategy, both always_inline: left to the inliner,
    // the split by head dim compiled to other SASS than the same code written in the step.
    //
    // Split by keys. The GEMMs go to the tensor cores in the order dV, dQ, dK, so that each
    // waits on the next: dV (P^T from registers) runs under the dS hand-off (the fence and
    // the barrier with the other warpgroup), and dK under dQ's hand-off to the writer warp.
    auto gradients_split_by_keys = [&](auto const& acc_s, auto const& acc_dp, int m, int step_index, int stage,
                                       int buffer) __attribute__((always_inline)) {
      // dS^T is stored before dV's GEMM is issued, so that its stores drain under the issue
      // (measured +0.5-1.6% at d128, session 18, against the other order).
      Tensor ds16 = convert_fragment<Element>(acc_dp);
      copy(ds_copy, thread_ds_copy.retile_S(ds16), tDSsdSt(_, _, _, buffer));
      Tensor p16 = convert_fragment<Element>(acc_s);
      Tensor tOrP = make_tensor(p16.data(), acc_as_operand_a(p16.layout()));
      warpgroup_gemm<false, -1>(mma_kv, tOrP, tKVrdOt(_, _, _, stage), acc_dv);
      cutlass::arch::fence_view_async_shared();  // dS is read next by WGMMA (async proxy)
      barrier_sync(Barrier::kConsumers, kConsumerThreads);
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      warpgroup_gemm<true, -1>(mma_dq, tDQrdS(_, _, _, buffer), tDQrKt, acc_dq);
      Tensor tOrdS = make_tensor(ds16.data(), acc_as_operand_a(ds16.layout()));
      warpgroup_gemm<false, -1>(mma_kv, tOrdS, tKVrQt(_, _, _, stage), acc_dk);
      warpgroup_wait<1>();  // dV and dQ done; dK runs on
      if constexpr (Traits::kDQAtomics) {
        add_dq_to_global(acc_dq, head, batch, m, blocks);
      } else {
        hand_dq_to_writer(acc_dq, step_index);
      }
      warpgroup_wait<0>();  // dK done too: the Q/dO stage is free
      if (warpgroup_leader()) { ring.release(position); }
      position.advance();
    };

    // Split by head dim. Each warpgroup's dV and dK columns need every key's P^T and dS^T:
    // both go through shared memory, and dQ goes to global memory from registers.
    auto gradients_split_by_head_dim = [&](auto const& acc_s, auto const& acc_dp, int m, int stage,
                                           int buffer) __attribute__((always_inline)) {
      Tensor p16 = convert_fragment<Element>(acc_s);
      Tensor ds16 = convert_fragment<Element>(acc_dp);
      Tensor sPt = make_tensor(make_smem_ptr(pt_data()), typename Traits::SmemLayoutDSt{});
      Tensor tPsPt = thread_ds_copy.partition_D(sPt);
      Tensor tKVsPt = thread_kv.partition_fragment_A(sPt);  // (MMA, N, K, buffer) descriptors
      Tensor tKVsdSt = thread_kv.partition_fragment_A(sdSt);
      copy(ds_copy, thread_ds_copy.retile_S(p16), tPsPt(_, _, _, buffer));
      copy(ds_copy, thread_ds_copy.retile_S(ds16), tDSsdSt(_, _, _, buffer));
      cutlass::arch::fence_view_async_shared();  // read next by WGMMA (async proxy)
      barrier_sync(Barrier::kConsumers, kConsumerThreads);
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      warpgroup_gemm<false, -1>(mma_kv, tKVsPt(_, _, _, buffer), tKVrdOt(_, _, _, stage), acc_dv);
      warpgroup_gemm<false, -1>(mma_kv, tKVsdSt(_, _, _, buffer), tKVrQt(_, _, _, stage), acc_dk);
      warpgroup_gemm<true, -1>(mma_dq, tDQrdS(_, _, _, buffer), tDQrKt, acc_dq);
      warpgroup_wait<0>();  // dV, dK and dQ done: the Q/dO stage is free
      if (warpgroup_leader()) { ring.release(position); }
      position.advance();
      add_dq_to_global(acc_dq, head, batch, m, blocks);
    };

    // One query tile: S^T and dP^T, P^T and dS^T from them, then the gradient GEMMs.
    auto step = [&](int m, int step_index, auto masked) {
      ring.wait_full(position);
      int const stage = position.stage;
      int const buffer = step_index & 1;  // of the dS (and P) shared-memory tiles
      Tensor lse_log2 = make_tensor<float>(Int<kPreloadLse ? kCols : 1>{});
      if constexpr (kPreloadLse) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) { lse_log2(c) = smem.lse_log2[stage][column_of(c)]; }
        warpgroup_fence_operand(lse_log2);  // loaded before the GEMMs below are issued
      }
      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
      warpgroup_gemm</*zero_init=*/true, /*wait=*/-1>(mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_s);
      warpgroup_gemm<true, -1>(mma_sdp, tSrV, tSrdO(_, _, _, stage), acc_dp);
      probabilities_and_ds(acc_s, acc_dp, m, masked, stage, lse_log2);
      if constexpr (Traits::kSplitHeadDim) {
        gradients_split_by_head_dim(acc_s, acc_dp, m, stage, buffer);
      } else {
        gradients_split_by_keys(acc_s, acc_dp, m, step_index, stage, buffer);
      }
    };

    int const steps_before = steps_done;
    for (int m = blocks.m_begin; m < blocks.m_end; ++m) {
      if (!blocks.visits(m)) { continue; }
      if (blocks.needs_mask(m)) {
        step(m, steps_done, std::true_type{});
      } else {
        step(m, steps_done, std::false_type{});
      }
      ++steps_done;
    }
    // Every GEMM on K and V has completed (each step ends with warpgroup_wait<0>), and
    // every thread has passed the kv_full wait above: the GEMMs are warpgroup-wide, and a
    // tile without steps syncs here, lest the next tile's load complete kv_full's next
    // phase before a lagging thread checked this one.
    if (steps_done == steps_before) { barrier_sync(Barrier::kConsumers, kConsumerThreads); }
    if (warpgroup_leader()) { cutlass::arch::ClusterBarrier::arrive(&smem.kv_empty); }
  }

  // After the last tile: takes the writer's arrival for the last hand-off.
  __device__ void finish() {
    if constexpr (!Traits::kDQAtomics) {
      if (steps_done > 0) { barrier_sync(Barrier::kDQEmpty, Traits::kDQWriterBarrierThreads, thread_idx / 128); }
    }
  }

  // Gives this warpgroup's part of the step's dQ to its writer warp (see BwdDQWriter), once
  // the writer has read the previous step's.
  template <class AccDQ>
  __device__ void hand_dq_to_writer(AccDQ const& acc_dq, int step_index) {
    static_assert(Traits::kDQValuesPerThread % 4 == 0);
    constexpr int kWriterThreads = Traits::kDQWriterBarrierThreads;
    int const warpgroup = thread_idx / 128;
    if (step_index > 0) { barrier_sync(Barrier::kDQEmpty, kWriterThreads, warpgroup); }
    CUTLASS_PRAGMA_UNROLL
    for (int v = 0; v < Traits::kDQValuesPerThread; v += 4) {
      *reinterpret_cast<float4*>(&smem.dq.data[dq_index<Traits::kDQValuesPerThread>(thread_idx, v)]) =
          make_float4(acc_dq(v), acc_dq(v + 1), acc_dq(v + 2), acc_dq(v + 3));
    }
    cutlass::arch::fence_view_async_shared();  // the bulk reduce reads through the async proxy
    barrier_arrive(Barrier::kDQFull, kWriterThreads, warpgroup);
  }

  // Adds this step's dQ into the float32 accumulator with 16-byte reductions, in the same
  // interleaved order as the writer warp's tile (see dq_index). Deterministic: the key
  // blocks of a query tile take turns, in the writer warp's order.
  template <class AccDQ>
  __device__ void add_dq_to_global(AccDQ const& acc_dq, int head, int batch, int m,
                                   typename Traits::Blocks const& blocks) {
    int64_t const tile = (int64_t(batch) * p.heads + head) * p.num_m_blocks + m;
    float* const dq = p.dq_accum + tile * Traits::kDQFloats;
    int const turn = p.deterministic ? blocks.dq_turn(m, p.dq_descending) : 0;
    // One base address, then compile-time offsets: each reduction's address is an immediate
    // on it, not a register of its own that the next reduction must wait to reuse.
    constexpr int kV = Traits::kDQValuesPerThread;
    static_assert(dq_index<kV>(0, 4) - dq_index<kV>(0, 0) == 4 * 128, "fours are 128 threads apart");
    float* const base = dq + dq_index<kV>(thread_idx, 0);
    consumers_add_in_turn<kConsumerThreads>(p.deterministic, p.dq_semaphore + tile, turn, thread_idx, [&] {
      CUTLASS_PRAGMA_UNROLL
      for (int v = 0; v < kV; v += 4) {
        reduce_add_f32x4(base + v * 128, acc_dq(v), acc_dq(v + 1), acc_dq(v + 2), acc_dq(v + 3));
      }
    });
  }
};

}  // namespace jax_fa3
