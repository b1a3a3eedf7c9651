// Writing dK and dV from the consumer warpgroups' registers: to the outputs through a
// shared-memory tile, or (GQA) added in float32 into the group's accumulators, in head
// order when deterministic.
#pragma once

#include <cute/tensor.hpp>

#include "common/barriers.h"
#include "common/layouts.h"
#include "bwd/producer.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct BwdEpilogue {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;

  using Storage = typename Traits::SharedStorage;
  static constexpr int kConsumerThreads = Traits::kConsumerThreads;
  // The dS tiles (split by head dim, with the P tiles that follow them) are free between
  // tiles and hold one of dK, dV in 16 bits.
  static_assert(Traits::kStagingBytes >= kBlockN * kHeadDim * sizeof(Element), "dK/dV must fit the staging tiles");
  static constexpr int kVector = 16 / sizeof(Element);  // elements per 16-byte piece
  static constexpr int kPiecesPerRow = kHeadDim / kVector;
  static_assert(kPiecesPerRow % 8 == 0, "the swizzle permutes 8 pieces per row");

  Params const& p;
  Storage& smem;
  int const thread_idx;  // among the consumer threads

  template <class AccDK, class AccDV>
  __device__ void store(int n_block, int head, int batch, AccDK& acc_dk, AccDV& acc_dv) {
    typename Traits::TiledMmaKV mma_kv;
    Tensor coords = mma_kv.get_thread_slice(thread_idx).partition_C(
        make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= p.softmax_scale; }

    int const kv_head = head / p.kv_group;
    int64_t const base = batch * p.dk_batch_stride + kv_head * p.dk_head_stride;
    if (p.kv_group == 1) {
      Element* const dk = p.dk + base + int64_t(n_block) * kBlockN * p.dk_row_stride;
      Element* const dv = p.dv + base + int64_t(n_block) * kBlockN * p.dk_row_stride;
      int const rows = min(kBlockN, p.seqlen_k - n_block * kBlockN);
      store_through_shared(acc_dk, coords, dk, rows);
      store_through_shared(acc_dv, coords, dv, rows);
      barrier_sync(Barrier::kConsumers, kConsumerThreads);  // read out before the next tile's dS
      return;
    }
    // GQA: sum over the query heads of the group.
    auto for_each_value = [&](auto&& f) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc_dk); i += 2) {  // pairs of adjacent columns
        int const key = n_block * kBlockN + get<0>(coords(i));
        if (key < p.seqlen_k) { f(i, base + key * p.dk_row_stride + get<1>(coords(i))); }
      }
    };
    int* const semaphore = p.dkv_semaphore + (int64_t(batch) * p.kv_heads + kv_head) * p.num_n_blocks + n_block;
    consumers_add_in_turn<Traits::kConsumerThreads>(p.deterministic, semaphore, head % p.kv_group, thread_idx, [&] {
      for_each_value([&](int i, int64_t offset) {
        atomicAdd(&p.dk_accum[offset], acc_dk(i));
        atomicAdd(&p.dk_accum[offset + 1], acc_dk(i + 1));
        atomicAdd(&p.dv_accum[offset], acc_dv(i));
        atomicAdd(&p.dv_accum[offset + 1], acc_dv(i + 1));
      });
    });
  }

  // The fragments go into a row-major tile whose 16-byte pieces are permuted by row (piece
  // ^ row % 8), so that the 8 rows of one warp's pair store hit distinct banks; the tile
  // then goes out in whole 16-byte pieces of rows. Straight from the fragments, each warp
  // store covers 8 rows of 16 bytes: at 1k tokens per sequence those stores took a fifth
  // of the consumers' time.
  template <class Acc, class Coords>
  __device__ void store_through_shared(Acc const& acc, Coords const& coords, Element* out, int rows) {
    Element* const tile = reinterpret_cast<Element*>(smem.ds.data());
    auto at = [](int row, int col, int row_mod_8) {
      return row * kHeadDim + ((col / kVector) ^ row_mod_8) * kVector + col % kVector;
    };
    // Every consumer is past its last GEMM on dS, or has read the tile's previous content.
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
    // A thread's rows in an accumulator fragment are 8 apart: one swizzle key for all.
    int const row_mod_8 = get<0>(coords(0)) % 8;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); i += 2) {  // an accumulator fragment's values pair up along a row
      int const row = get<0>(coords(i)), col = get<1>(coords(i));
      *reinterpret_cast<uint32_t*>(&tile[at(row, col, row_mod_8)]) = pack_pair<Element>(acc(i), acc(i + 1));
    }
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
    CUTLASS_PRAGMA_UNROLL
    for (int piece = thread_idx; piece < kBlockN * kPiecesPerRow; piece += kConsumerThreads) {
      int const row = piece / kPiecesPerRow, col = piece % kPiecesPerRow * kVector;
      if (row < rows) {
        *reinterpret_cast<uint4*>(&out[row * p.dk_row_stride + col]) =
            *reinterpret_cast<uint4 const*>(&tile[at(row, col, row % 8)]);
      }
    }
  }
};

}  // namespace jax_fa3
