// Writing a finished query tile: O through shared memory and a TMA store, the
// log-sum-exp straight from registers; tiles with no visible key get zeros and -inf.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/barriers.h"
#include "common/layouts.h"
#include "common/tile_scheduler.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct FwdEpilogue {
  using Element = typename Traits::ElementOut;
  using Params = typename Traits::Params;
  using Storage = typename Traits::SharedStorage;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static constexpr int kConsumerThreads = Traits::kConsumerThreads;

  Params const& p;
  Storage& smem;
  int const thread_idx;  // among the consumer threads

  __device__ int64_t lse_offset(QueryTile const& tile) const {
    return (int64_t(tile.batch) * p.heads + tile.head) * p.seqlen_q;
  }

  // acc_o is already normalised. rows_in_tile[r] is the tile row of the thread's row r.
  template <int kRows, class AccO>
  __device__ void store(QueryTile const& tile, AccO const& acc_o, float const (&lse)[kRows],
                        int const (&rows_in_tile)[kRows]) {
    // Each row's four quad threads hold the same LSE; the first writes it.
    if (thread_idx % 4 == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        int const row = tile.m_block * kBlockM + rows_in_tile[r];
        if (row < p.seqlen_q) { p.lse[lse_offset(tile) + row] = lse[r]; }
      }
    }

    Tensor o = convert_fragment<Element>(acc_o);
    // Before O overwrites its buffer: with O in V's buffers every warpgroup must have
    // finished its last P·V; with its own buffer, the previous tile's store must have read it.
    if (!Traits::kOAliasesV && is_store_thread()) { tma_store_wait<0>(); }
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
    Tensor sO = make_tensor(make_smem_ptr(smem.vo.o.data()), typename Traits::SmemLayoutO{});
    auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, typename Traits::TiledMmaPV{});
    auto thread_copy = smem_copy.get_thread_slice(thread_idx);
    copy(smem_copy, thread_copy.retile_S(o), thread_copy.partition_D(sO));
    // stmatrix writes through the generic proxy; TMA reads through the async proxy.
    cutlass::arch::fence_view_async_shared();
    if constexpr (Traits::kEarlyTileHandoff) {
      // Only the storing warp waits for the whole of O; the others arrive and go on to the
      // next tile. The barrier is not kConsumers: a warp that went on can reach that one
      // next, and it waits for the storing warp.
      if (is_store_warp()) {
        barrier_sync(Barrier::kOStaged, kConsumerThreads);
      } else {
        barrier_arrive(Barrier::kOStaged, kConsumerThreads);
      }
    } else {
      barrier_sync(Barrier::kConsumers, kConsumerThreads);
    }

    if (is_store_thread()) {
      Tensor mO = p.tma_o.get_tma_tensor(make_shape(p.seqlen_q, int(kHeadDimV), p.heads, p.batch));
      Tensor gO = local_tile(mO(_, _, tile.head, tile.batch), Shape<Int<kBlockM>, Int<kHeadDimV>>{},
                             make_coord(tile.m_block, _0{}));
      auto o_parts = tma_partition(p.tma_o, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sO), group_modes<0, 2>(gO));
      Tensor tOg = get<0>(o_parts);
      Tensor tOs = get<1>(o_parts);
      copy(p.tma_o, tOs, tOg);  // rows past seqlen_q are clipped by TMA
      tma_store_arrive();
      if constexpr (Traits::kOAliasesV) {
        tma_store_wait<0>();
        cutlass::arch::ClusterBarrier::arrive(&smem.o_free);
      }
    }
  }

  // Packed sequences: rows [row_begin, row_end) of the tile's batch row, through shared memory
  // and 16-byte stores by every consumer thread (a TMA store of the whole tile would also
  // write the next tile's rows).
  template <int kRows, class AccO>
  __device__ void store_rows(QueryTile const& tile, int row_begin, int row_end, AccO const& acc_o,
                             float const (&lse)[kRows], int const (&rows_in_tile)[kRows]) {
    int const rows = min(kBlockM, min(row_end, p.seqlen_q) - row_begin);
    if (thread_idx % 4 == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kRows; ++r) {
        if (rows_in_tile[r] < rows) { p.lse[lse_offset(tile) + row_begin + rows_in_tile[r]] = lse[r]; }
      }
    }
    Tensor o = convert_fragment<Element>(acc_o);
    // With O in V's buffers every warpgroup must have finished its last P·V; with its own
    // buffer, every thread must have read the previous tile's O.
    barrier_sync(Barrier::kConsumers, kConsumerThreads);
    Tensor sO = make_tensor(make_smem_ptr(smem.vo.o.data()), typename Traits::SmemLayoutO{});
    auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, typename Traits::TiledMmaPV{});
    auto thread_copy = smem_copy.get_thread_slice(thread_idx);
    copy(smem_copy, thread_copy.retile_S(o), thread_copy.partition_D(sO));
    barrier_sync(Barrier::kConsumers, kConsumerThreads);

    constexpr int kPerChunk = 16 / sizeof(Element);  // 16-byte pieces of a row stay whole in the swizzle
    constexpr int kChunksPerRow = kHeadDimV / kPerChunk;
    Element* const out = p.out + tile.batch * p.o_batch_stride + tile.head * p.o_head_stride +
                         int64_t(row_begin) * p.o_row_stride;
    for (int i = thread_idx; i < rows * kChunksPerRow; i += kConsumerThreads) {
      int const row = i / kChunksPerRow, column = i % kChunksPerRow * kPerChunk;
      // Through the element reference: sO's pointer applies the swizzle when dereferenced.
      uint4 const piece = *reinterpret_cast<uint4 const*>(&sO(row, column));
      *reinterpret_cast<uint4*>(out + int64_t(row) * p.o_row_stride + column) = piece;
    }
    if constexpr (Traits::kOAliasesV) {  // V may take the buffers back once every thread has read O
      barrier_sync(Barrier::kConsumers, kConsumerThreads);
      if (is_store_thread()) { cutlass::arch::ClusterBarrier::arrive(&smem.o_free); }
    }
  }

  // The last warp stores: it is the last in the pingpong order, so its waits for the
  // store delay the next tile the least.
  __device__ bool is_store_thread() const { return thread_idx == kConsumerThreads - 32; }
  __device__ bool is_store_warp() const { return thread_idx / 32 == kConsumerThreads / 32 - 1; }

  // Outstanding stores must finish reading shared memory before the CTA exits.
  __device__ void finish() const {
    if (is_store_thread()) { tma_store_wait<0>(); }
  }

  // A tile in which no row sees any key: out = 0, lse = the sink (-inf without one) for rows
  // before seqlen_q (the used length), -inf after.
  __device__ void store_empty(QueryTile const& tile, int seqlen_q) {
    store_empty(tile, tile.m_block * kBlockM, p.seqlen_q, seqlen_q);
  }

  // The same for rows [first_row, min(first_row + kBlockM, end_row)) (a packed tile's).
  __device__ void store_empty(QueryTile const& tile, int first_row, int end_row, int seqlen_q) {
    int const rows = min(kBlockM, min(end_row, p.seqlen_q) - first_row);
    constexpr int kChunksPerRow = kHeadDimV * sizeof(Element) / sizeof(uint4);
    Element* const out = p.out + tile.batch * p.o_batch_stride + tile.head * p.o_head_stride +
                         int64_t(first_row) * p.o_row_stride;
    for (int i = thread_idx; i < rows * kChunksPerRow; i += kConsumerThreads) {
      reinterpret_cast<uint4*>(out + int64_t(i / kChunksPerRow) * p.o_row_stride)[i % kChunksPerRow] =
          make_uint4(0, 0, 0, 0);
    }
    float const sink = p.sinks ? p.sinks[int64_t(tile.batch) * p.heads + tile.head] : -INFINITY;
    for (int r = thread_idx; r < rows; r += kConsumerThreads) {
      p.lse[lse_offset(tile) + first_row + r] = first_row + r < seqlen_q ? sink : -INFINITY;
    }
  }
};

}  // namespace jax_fa3
