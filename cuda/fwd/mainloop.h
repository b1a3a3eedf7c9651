// The consumer warpgroups' mainloop: S = Q·K^T, online softmax, O += P·V over the key
// tiles of one query tile. Two overlaps hide the softmax under the tensor cores:
// - within a warpgroup, Q·K[n]^T is issued together with P·V[n+1], and the softmax of
//   S[n] runs while P·V[n+1] is still in flight;
// - between warpgroups (pingpong), named barriers let one warpgroup issue its WGMMAs
//   while the other does its softmax.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/barriers.h"
#include "common/gemm.h"
#include "common/layouts.h"
#include "common/mask.h"
#include "common/segments.h"
#include "common/max_logit.h"
#include "common/softmax.h"
#include "common/tile_scheduler.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct FwdMainloop {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  using Ring = TmaRing<Traits::kStages>;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kConsumerWarpgroups = Traits::kConsumerWarpgroups;
  static constexpr int kRows = 2;  // rows of the 64-row WGMMA atom held by each thread

  Params const& p;
  Storage& smem;
  int const thread_idx;  // among the consumer threads
  int const warpgroup;   // consumer warpgroup index
  Ring k_ring{smem.k_ring};
  Ring v_ring{v_ring_storage(smem)};  // V^T as P·V reads it
  typename Ring::Position k_pos, v_pos;
  int computed_tiles = 0;

  // Pingpong: a warpgroup waits for its turn before issuing WGMMAs and hands the turn
  // to the next warpgroup right after. Each barrier joins one waiting and one arriving
  // warpgroup.
  __device__ void wait_turn() const {
    if constexpr (Traits::kPingpong) { barrier_sync(Barrier::kPingpong, 256, warpgroup); }
  }
  __device__ void pass_turn() const {
    if constexpr (Traits::kPingpong) {
      barrier_arrive(Barrier::kPingpong, 256, (warpgroup + 1) % kConsumerWarpgroups);
    }
  }
  // The first warpgroup starts with the turn.
  __device__ void init_turns() const {
    if constexpr (Traits::kPingpong) {
      if (warpgroup == kConsumerWarpgroups - 1) { barrier_arrive(Barrier::kPingpong, 256, 0); }
    }
  }

  static __device__ typename Ring::Storage& v_ring_storage(Storage& s) {
    if constexpr (Traits::kFp8) {
      return s.transposed.vt_ring;
    } else {
      return s.v_ring;
    }
  }
  static __device__ auto* vt_data(Storage& s) {
    if constexpr (Traits::kFp8) {
      return s.transposed.vt.data();
    } else {
      return s.vo.v.data();
    }
  }

  // FP8: the descale factors of q (this warpgroup's 64 rows) and k (one key tile); 1 when absent.
  __device__ float q_descale(QueryTile const& tile) const {
    if (!p.descale_q) { return 1.f; }
    int const block = tile.m_block * kConsumerWarpgroups + warpgroup;
    return p.descale_q[(int64_t(tile.batch) * p.heads + tile.head) * p.descale_q_blocks +
                       block * p.descale_q_block_stride];
  }
  // k's factors of the tile's KV head, one per key tile (a stride of 0: one per head), or
  // nullptr; found once per tile so that a step costs one load, not an integer division.
  __device__ float const* k_descales(QueryTile const& tile) const {
    if (!p.descale_k) { return nullptr; }
    return p.descale_k + (int64_t(tile.batch) * p.kv_heads + tile.head / p.kv_group) * p.descale_k_blocks;
  }
  __device__ float k_descale(float const* descales, int n_block) const {
    return descales ? descales[n_block * p.descale_k_block_stride] : 1.f;
  }

  __device__ bool warpgroup_leader() const { return thread_idx % 128 == 0; }

  // FP8: most key tiles leave every row maximum where it was (factor exactly 1); a warp
  // whose rows all kept theirs skips the rescale of its output accumulator. Exact: the
  // skipped products are x * 1.
  template <class AccO>
  __device__ void rescale_unless_unchanged(AccO& acc_o, float const (&o_scale)[kRows]) const {
    bool unchanged = true;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) { unchanged &= o_scale[r] == 1.f; }
    if (!__all_sync(0xffffffff, unchanged)) { scale_rows(acc_o, o_scale); }
  }

  __device__ void release_k() {
    if (warpgroup_leader()) { k_ring.release(k_pos); }
    k_pos.advance();
  }
  __device__ void release_v() {
    if (warpgroup_leader()) { v_ring.release(v_pos); }
    v_pos.advance();
  }

  // The tile rows that this thread's accumulator rows map to.
  __device__ void rows_in_tile(int (&rows)[kRows]) const {
    typename Traits::TiledMmaQK mma;
    Tensor coords = mma.get_thread_slice(thread_idx).partition_C(
        make_identity_tensor(select<0, 1>(typename Traits::TileShapeQK{})));
    Tensor rc = make_tensor(coords.data(), acc_rows_cols(coords.layout()));
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) { rows[r] = get<0>(rc(r, 0)); }
  }

  // A warpgroup whose 64 rows all lie past seqlen_q (the last query tile of a sequence that
  // is not a multiple of kBlockM, or a packed tile cut short at a document) issues no GEMM
  // and computes no softmax, so that the tensor cores go to the other warpgroups. It still
  // takes every turn and every wait and release on the Q, K and V buffers, in the order
  // compute() does, so the rings' phases and the pingpong order stay those of a full tile.
  // Its rows are never stored.
  __device__ void skip_tile(KeyBlockRange<kBlockM, kBlockN> const& range) {
    cutlass::arch::ClusterTransactionBarrier::wait(&smem.q_full, computed_tiles & 1);
    k_ring.wait_full(k_pos);
    wait_turn();
    pass_turn();
    release_k();
    for (int n = range.n_block_max - 2; n >= range.n_block_min; --n) {
      k_ring.wait_full(k_pos);
      wait_turn();
      v_ring.wait_full(v_pos);
      pass_turn();
      release_k();
      release_v();
    }
    if (warpgroup_leader()) { cutlass::arch::ClusterBarrier::arrive(&smem.q_empty); }
    v_ring.wait_full(v_pos);
    wait_turn();
    pass_turn();
    release_v();
    ++computed_tiles;
  }

  // Packed sequences: a planned tile (fwd/key_blocks.h). Rows past row_end come out as 0 and -inf.
  template <class AccO>
  __device__ void compute(QueryTile const& tile, PlannedTile<kBlockM, kBlockN> const& planned, AccO& acc_o,
                          float (&lse)[kRows], int const (&rows)[kRows]) {
    compute(tile, planned.blocks, planned.row_end, p.seqlen_k, acc_o, lse, rows, &planned);
  }

  // Computes one query tile into acc_o (normalised) and lse. Rows at or past seqlen_q
  // come out as 0 and -inf.
  template <class AccO>
  __device__ void compute(QueryTile const& tile, KeyBlockRange<kBlockM, kBlockN> const& range, int seqlen_q,
                          int seqlen_k, AccO& acc_o, float (&lse)[kRows], int const (&rows)[kRows],
                          PlannedTile<kBlockM, kBlockN> const* planned = nullptr) {
    // Where the tile's rows start: planned, or by its m_block.
    auto const first_row = [&] {
      if constexpr (Traits::kHasSegments) {
        return planned->row_begin;
      } else {
        return tile.m_block * kBlockM;
      }
    };
    // Packed, seqlen_q is the planned tile's row_end: a tile cut at a document's end
    // leaves its last warpgroups idle just the same.
    if (first_row() + warpgroup * (kBlockM / kConsumerWarpgroups) >= seqlen_q) {
      clear(acc_o);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) { lse[r] = -INFINITY; }
      skip_tile(range);
      return;
    }
    typename Traits::TiledMmaQK mma_qk;
    typename Traits::TiledMmaPV mma_pv;
    auto thread_qk = mma_qk.get_thread_slice(thread_idx);
    auto thread_pv = mma_pv.get_thread_slice(thread_idx);
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(vt_data(smem)), typename Traits::SmemLayoutVt{});
    Tensor tSrQ = thread_qk.partition_fragment_A(sQ);
    Tensor tSrK = thread_qk.partition_fragment_B(sK);
    Tensor tOrVt = thread_pv.partition_fragment_B(sVt);
    auto const tile_coords = make_identity_tensor(select<0, 1>(typename Traits::TileShapeQK{}));
    Tensor thread0_coords = mma_qk.get_thread_slice(_0{}).partition_C(tile_coords);
    int const column_offset = get<1>(thread_qk.partition_C(tile_coords)(0));

    // Packed sequences: each row's visible keys; else the window rule.
    auto const mask = [&] {
      if constexpr (Traits::kHasSegments) {
        RowSpans<kRows> spans;
        spans.load(p.q_rows + int64_t(tile.batch) * p.seqlen_q, p.seqlen_q, first_row(), rows);
        return spans;
      } else {
        return AttentionMask{seqlen_k, p.window_left, p.window_right, p.diagonal_offset};
      }
    }();
    OnlineSoftmax<kRows, Traits::kFp8, Traits::kExp2OnFmaPer8> softmax;
    softmax.scale_log2 = p.scale_log2;
    float const scale_q = Traits::kFp8 ? q_descale(tile) : 1.f;
    float const* const tile_k_descales = Traits::kFp8 ? k_descales(tile) : nullptr;
    // FP8 descales scale the scores before the softcap, or else fold into the exp2 scale.
    // k_scale: k_descale of the tile, loaded before its Q·K^T is issued.
    auto prepare_scores = [&](auto& scores, int n_block, auto masked, float k_scale) {
      if constexpr (Traits::kFp8) {
        float const descale = scale_q * k_scale;
        if (p.softcap_prescale != 0.f) {
          apply_softcap(scores, p.softcap_prescale * descale);
        } else {
          softmax.scale_log2 = p.scale_log2 * descale;
        }
      } else {
        if (p.softcap_prescale != 0.f) { apply_softcap(scores, p.softcap_prescale); }
      }
      if constexpr (decltype(masked)::value) {
        if constexpr (Traits::kHasSegments) {
          int64_t const first_key = planned->key_offset;  // key block 0's first key
          mask.template apply<kBlockN>(scores, thread0_coords, first_key + int64_t(n_block) * kBlockN + column_offset,
                                       p.kv_rows + int64_t(tile.batch) * p.seqlen_k, p.seqlen_k);
        } else {
          mask.template apply<kBlockM, kBlockN>(scores, thread0_coords, rows, column_offset, tile.m_block, n_block);
        }
      }
    };
    auto new_scores = [&] { return partition_fragment_C(mma_qk, select<0, 1>(typename Traits::TileShapeQK{})); };

    clear(acc_o);
    float o_scale[kRows];

    // Prologue: S for the rightmost key tile, which holds the key-length or diagonal edge
    // whenever there is one; masked unless fully visible (kUnmaskedPrologue: keys a multiple
    // of the tile without a window, as most unmasked calls are).
    cutlass::arch::ClusterTransactionBarrier::wait(&smem.q_full, computed_tiles & 1);
    int n_block = range.n_block_max - 1;
    float const first_k_scale = Traits::kFp8 ? k_descale(tile_k_descales, n_block) : 1.f;
    Tensor scores = new_scores();
    k_ring.wait_full(k_pos);
    wait_turn();
    warpgroup_gemm</*zero_init=*/true, /*wait=*/-1>(mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), scores);
    pass_turn();
    warpgroup_wait<0>();
    release_k();
    if (!Traits::kUnmaskedPrologue || n_block >= range.n_block_right_masked || n_block < range.n_block_left_masked) {
      prepare_scores(scores, n_block, std::true_type{}, first_k_scale);
    } else {
      prepare_scores(scores, n_block, std::false_type{}, first_k_scale);
    }
    softmax.template update</*first=*/true>(scores, o_scale);
    auto const into_operand = [](auto const& probabilities, auto& operand) {
      if constexpr (Traits::kFp8) {
        convert_to_fp8_operand_a(probabilities, operand);
      } else {
        convert_into(probabilities, operand);
      }
    };
    Tensor tOrP = [&] {
      if constexpr (Traits::kFp8) {
        return make_tensor<Element>(fp8_operand_a_layout<kBlockN>());
      } else {
        return make_tensor<Element>(acc_as_operand_a(scores.layout()));
      }
    }();
    into_operand(scores, tOrP);

    auto step = [&](int n, auto masked) {
      float const k_scale = Traits::kFp8 ? k_descale(tile_k_descales, n) : 1.f;
      Tensor next_scores = new_scores();
      k_ring.wait_full(k_pos);
      wait_turn();
      warpgroup_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, k_pos.stage), next_scores);
      if constexpr (Traits::kRescaleOBeforeGemm) { scale_rows(acc_o, o_scale); }
      v_ring.wait_full(v_pos);
      warpgroup_gemm<false, -1>(mma_pv, tOrP, tOrVt(_, _, _, v_pos.stage), acc_o);
      pass_turn();
      if constexpr (!Traits::kIntraWarpgroupOverlap) { warpgroup_wait<0>(); }  // ablation: serial
      warpgroup_wait<1>();  // Q·K^T done; P·V still running under the softmax below
      release_k();
      prepare_scores(next_scores, n, masked, k_scale);
      softmax.template update<false>(next_scores, o_scale);
      // row_sum depends on every probability of the tile.
      finish_before_next_wait(softmax.row_sum[0] + softmax.row_sum[1], p.num_tiles < 0, &smem.unused_sink);
      warpgroup_wait<0>();
      release_v();
      if constexpr (Traits::kFp8) {
        rescale_unless_unchanged(acc_o, o_scale);
      } else if constexpr (!Traits::kRescaleOBeforeGemm) {
        scale_rows(acc_o, o_scale);
      }
      into_operand(next_scores, tOrP);
    };
    --n_block;
    for (; n_block >= range.n_block_min && n_block >= range.n_block_right_masked; --n_block) {
      step(n_block, std::true_type{});
    }
    for (; n_block >= range.n_block_min && n_block >= range.n_block_left_masked; --n_block) {
      step(n_block, std::false_type{});
    }
    for (; n_block >= range.n_block_min; --n_block) { step(n_block, std::true_type{}); }

    // Every Q·K^T of the tile is done: the producer may load the next Q.
    if (warpgroup_leader()) { cutlass::arch::ClusterBarrier::arrive(&smem.q_empty); }

    if constexpr (Traits::kRescaleOBeforeGemm) { scale_rows(acc_o, o_scale); }
    v_ring.wait_full(v_pos);
    wait_turn();
    warpgroup_gemm<false, -1>(mma_pv, tOrP, tOrVt(_, _, _, v_pos.stage), acc_o);
    pass_turn();
    int64_t const head_index = int64_t(tile.batch) * p.heads + tile.head;
    softmax.finalize(o_scale, lse, p.sinks ? p.sinks[head_index] : -INFINITY);
    if constexpr (Traits::kFp8) {
      if (p.descale_v) {
        float const scale_v = p.descale_v[int64_t(tile.batch) * p.kv_heads + tile.head / p.kv_group];
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) { o_scale[r] *= scale_v; }
      }
    }
    bool inside[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      inside[r] = first_row() + rows[r] < seqlen_q;
      if (!inside[r]) {
        o_scale[r] = 0.f;
        lse[r] = -INFINITY;
      }
    }
    if (p.max_logit) { record_max_logit(p.max_logit + head_index, softmax.warp_max_score(inside)); }
    warpgroup_wait<0>();
    release_v();
    scale_rows(acc_o, o_scale);
    ++computed_tiles;
  }
};

}  // namespace jax_fa3
