// Backward postprocess: the float32 accumulators become the output gradients. dQ is
// accumulated in the dQ MMA's fragment order (see BwdTraits::dq_index), so each thread
// reads back exactly the values its twin in the main kernel produced.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

#include "common/layouts.h"

namespace jax_fa3 {

using namespace cute;

// Where value v of consumer thread t sits in a step's dQ tile: each warpgroup's values
// are one contiguous part (its writer warp adds that part alone), in groups of 4 floats
// interleaved across the warpgroup's threads, so that both the shared-memory stores of the
// main kernel and these reads are conflict-free and 16-byte wide.
template <int kValuesPerThread>
__host__ __device__ __forceinline__ constexpr int dq_index(int thread, int value) {
  int const warpgroup = thread / 128, lane = thread % 128;
  return warpgroup * 128 * kValuesPerThread + (value / 4) * 128 * 4 + lane * 4 + value % 4;
}

template <class Traits>
struct BwdPostprocessParams {
  float const* dq_accum;
  typename Traits::Element* dq;
  int64_t dq_row_stride, dq_head_stride, dq_batch_stride;
  float scale;
  int seqlen_q, heads, num_m_blocks, batch;
};

// grid (m_blocks, min(heads, 65535), min(batch, 65535)), one thread per main-kernel
// consumer thread. Each thread reads back its twin's values in fours (16-byte loads, see
// dq_index) and puts them, as 16-bit pairs, into a row-major tile in shared memory; the tile
// then goes out as whole 16-byte pieces of rows. (Storing the pairs straight from the
// fragment layout, 8 rows of 16 bytes per warp instruction, ran at a third of the memory
// bandwidth.)
template <class Traits>
__global__ void __launch_bounds__(Traits::kConsumerThreads) bwd_convert_dq_kernel(BwdPostprocessParams<Traits> const p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kVector = 16 / sizeof(Element);
  // 16 bytes of padding per row: the 8 rows of one pair store land on distinct banks.
  constexpr int kPitch = kHeadDim + kVector;
  __shared__ alignas(16) Element tile[kBlockM * kPitch];

  int const m_block = blockIdx.x;
  // A grid's y and z dimensions stop at 65535: more heads or batch rows than that take turns.
  for (int batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
    for (int head = blockIdx.y; head < p.heads; head += gridDim.y) {
      int const thread = threadIdx.x;
      float const* accum =
          p.dq_accum + ((int64_t(batch) * p.heads + head) * p.num_m_blocks + m_block) * Traits::kDQFloats;
      typename Traits::TiledMmaDQ mma;
      Tensor coords = mma.get_thread_slice(thread).partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
      static_assert(decltype(size(coords))::value == Traits::kDQValuesPerThread);
      static_assert(Traits::kDQValuesPerThread % 4 == 0);
      CUTLASS_PRAGMA_UNROLL
      for (int v = 0; v < Traits::kDQValuesPerThread; v += 4) {
        float4 const four = *reinterpret_cast<float4 const*>(&accum[dq_index<Traits::kDQValuesPerThread>(thread, v)]);
        float const values[4] = {four.x, four.y, four.z, four.w};
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 4; i += 2) {  // an accumulator fragment's values pair up along a row
          int const row = get<0>(coords(v + i)), col = get<1>(coords(v + i));
          *reinterpret_cast<uint32_t*>(&tile[row * kPitch + col]) = pack_pair<Element>(values[i] * p.scale, values[i + 1] * p.scale);
        }
      }
      __syncthreads();
      Element* dq = p.dq + batch * p.dq_batch_stride + head * p.dq_head_stride;
      constexpr int kPiecesPerRow = kHeadDim / kVector;
      CUTLASS_PRAGMA_UNROLL
      for (int piece = thread; piece < kBlockM * kPiecesPerRow; piece += Traits::kConsumerThreads) {
        int const r = piece / kPiecesPerRow, c = piece % kPiecesPerRow * kVector;
        int const row = m_block * kBlockM + r;
        if (row < p.seqlen_q) {
          *reinterpret_cast<uint4*>(&dq[row * p.dq_row_stride + c]) = *reinterpret_cast<uint4 const*>(&tile[r * kPitch + c]);
        }
      }
      __syncthreads();  // the tile is rewritten for the next (batch, head)
    }
  }
}

// GQA: dK and dV were summed over each group of query heads in float32.
template <class Element>
__global__ void __launch_bounds__(256) bwd_convert_kv_kernel(float const* accum, Element* out, int64_t count,
                                                            float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = Element(accum[i] * scale);
  }
}

}  // namespace jax_fa3
