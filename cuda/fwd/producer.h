// The producer warp: TMA loads of Q (once per tile) and of K and V (through stage rings),
// in the order the consumers use them.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/barriers.h"
#include "common/mask.h"
#include "common/tile_scheduler.h"
#include "fwd/key_blocks.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct FwdProducer {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  using Ring = TmaRing<Traits::kStages>;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;

  Params const& p;
  Storage& smem;
  bool const leader;  // the one lane that issues TMA and arrives on barriers
  Ring k_ring{smem.k_ring};
  Ring v_ring{smem.v_ring};
  typename Ring::Position k_pos, v_pos;
  int loaded_tiles = 0;

  // Keys are visited right to left (the masked edge first): K[n_max-1], Q, then
  // {K[n-1], V[n]} pairs, then the last V. V runs one tile behind K because each
  // consumer step issues Q·K[n-1]^T together with P·V[n].
  // first_row, first_key: where the tile's rows and its key block 0 start (packed sequences;
  // else its m_block's rows and key 0).
  __device__ void load_tile(QueryTile const& tile, KeyBlockRange<kBlockM, kBlockN> const& range, int first_row = 0,
                            int first_key = 0) {
    int const kv_head = tile.head / p.kv_group;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, int(Traits::kHeadDim), p.heads, p.batch));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, int(Traits::kHeadDim), p.kv_heads, p.batch));
    // A packed tile's K and V blocks start at first_key: the keys mode is 0 in K, 1 in V^T.
    auto const keys_from = [&](auto tensor, auto keys_mode) {
      if constexpr (!Traits::kHasSegments) {
        return tensor;
      } else if constexpr (decltype(keys_mode)::value == 0) {
        return domain_offset(make_coord(first_key, 0), tensor);
      } else {
        return domain_offset(make_coord(0, first_key), tensor);
      }
    };
    // 16-bit: V^T tiles (Dv, N); FP8: V tiles (N, Dv), staged for the transposing warps.
    auto const v_tiles = [&] {
      if constexpr (Traits::kFp8) {
        Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.seqlen_k, int(Traits::kHeadDimV), p.kv_heads, p.batch));
        return local_tile(mV(_, _, kv_head, tile.batch), Shape<Int<kBlockN>, Int<Traits::kHeadDimV>>{},
                          make_coord(_, _0{}));  // (N, Dv, n)
      } else {
        Tensor mVt = p.tma_v.get_tma_tensor(make_shape(int(Traits::kHeadDimV), p.seqlen_k, p.kv_heads, p.batch));
        return local_tile(keys_from(mVt(_, _, kv_head, tile.batch), _1{}),
                          Shape<Int<Traits::kHeadDimV>, Int<kBlockN>>{}, make_coord(_0{}, _));  // (Dv, N, n)
      }
    };
    auto const q_tile = [&] {
      if constexpr (Traits::kHasSegments) {
        return local_tile(domain_offset(make_coord(first_row, 0), mQ(_, _, tile.head, tile.batch)),
                          Shape<Int<kBlockM>, Int<Traits::kHeadDim>>{}, make_coord(0, _0{}));
      } else {
        return local_tile(mQ(_, _, tile.head, tile.batch), Shape<Int<kBlockM>, Int<Traits::kHeadDim>>{},
                          make_coord(tile.m_block, _0{}));
      }
    };
    Tensor gQ = q_tile();
    Tensor gK = local_tile(keys_from(mK(_, _, kv_head, tile.batch), _0{}), Shape<Int<kBlockN>, Int<Traits::kHeadDim>>{},
                           make_coord(_, _0{}));  // (N, D, n)
    Tensor gV = v_tiles();
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(smem.vo.v.data()), typename Traits::SmemLayoutVLoad{});
    // TMA-partitioned (global, shared) views.
    auto q_parts = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto k_parts = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto v_parts = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    Tensor tQg = get<0>(q_parts);
    Tensor tQs = get<1>(q_parts);
    Tensor tKg = get<0>(k_parts);
    Tensor tKs = get<1>(k_parts);
    Tensor tVg = get<0>(v_parts);
    Tensor tVs = get<1>(v_parts);

    // K and V are re-read by every query tile of the head: keep them in L2. Q is read once.
    auto load_k = [&](int n) {
      if (leader) {
        uint64_t& full = k_ring.acquire(k_pos, Traits::kBytesK);
        copy(p.tma_k.with(full, 0, TMA::CacheHintSm90::EVICT_LAST), tKg(_, n), tKs(_, k_pos.stage));
      }
      k_pos.advance();
    };
    auto load_v = [&](int n) {
      if (leader) {
        uint64_t& full = v_ring.acquire(v_pos, Traits::kBytesV);
        copy(p.tma_v.with(full, 0, TMA::CacheHintSm90::EVICT_LAST), tVg(_, n), tVs(_, v_pos.stage));
      }
      v_pos.advance();
    };

    uint32_t const previous_phase = (loaded_tiles - 1) & 1;
    int n = range.n_block_max - 1;
    load_k(n);
    if (leader) {
      if (loaded_tiles > 0) { cutlass::arch::ClusterBarrier::wait(&smem.q_empty, previous_phase); }
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.q_full, Traits::kBytesQ);
      copy(p.tma_q.with(smem.q_full, 0, TMA::CacheHintSm90::EVICT_FIRST), tQg, tQs);
      // An aliased output occupies V's buffers until its TMA store has read it.
      if (Traits::kOAliasesV && loaded_tiles > 0) {
        cutlass::arch::ClusterBarrier::wait(&smem.o_free, previous_phase);
      }
    }
    for (; n > range.n_block_min; --n) {
      load_k(n - 1);
      load_v(n);
    }
    load_v(range.n_block_min);
    ++loaded_tiles;
  }

  template <class Scheduler>
  __device__ void run(Scheduler& scheduler) {
    if constexpr (Traits::kHasSegments) {
      for (int tile_index = scheduler.first(); tile_index < scheduler.num_tiles;) {
        QueryTile tile = scheduler.decode(tile_index);
        auto const planned = planned_tile<Traits>(p, tile);
        tile.batch = planned.batch;
        if (!planned.blocks.empty()) { load_tile(tile, planned.blocks, planned.row_begin, planned.key_offset); }
        tile_index = scheduler.producer_next(tile_index);
      }
    } else {
      for (int tile_index = scheduler.first(); tile_index < p.num_tiles;) {
        QueryTile const tile = scheduler.decode(tile_index);
        int const seqlen_q = used_length(p.seqused_q, tile.batch, p.seqlen_q);
        int const seqlen_k = used_length(p.seqused_k, tile.batch, p.seqlen_k);
        auto const range = key_blocks<Traits>(p, tile, seqlen_q, seqlen_k);
        if (!range.empty()) { load_tile(tile, range); }
        tile_index = scheduler.producer_next(tile_index);
      }
    }
    if constexpr (Traits::kFp8) {  // tells the transposing warps to stop, once they drained the ring
      if (leader) {
        for (int i = 0; i < Traits::kStages; ++i) {
          v_ring.wait_empty(v_pos);
          v_pos.advance();
        }
        cutlass::arch::ClusterBarrier::arrive(&smem.transposed.v_done);
      }
    }
    scheduler.producer_finish();
  }
};

}  // namespace jax_fa3
