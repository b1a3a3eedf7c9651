// FP8 forward: V^T on chip. FP8 WGMMA reads its B operand K-major only, but V arrives
// row-major (keys x head dim). Producer warps 1-3 turn each staged V tile into V^T in shared
// memory between TMA and the consumers, so V is never transposed in HBM.
//
// The keys of V^T are permuted within every group of 16: V^T column 4t + i holds key
// 2t + (i & 1) + 8 (i >> 1), which is the order in which a thread's probability registers
// already form the FP8 A operand (common/layouts.h, convert_to_fp8_operand_a).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/barriers.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct VTransposer {
  using Storage = typename Traits::SharedStorage;
  using Ring = TmaRing<Traits::kStages>;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static constexpr int kThreads = Traits::kTransposeThreads;
  static_assert(kBlockN % 32 == 0 && kHeadDimV % 16 == 0);
  // A warp moves one unit per step: 32 keys x 16 dims, a 4x4-byte block per thread.
  static constexpr int kKeyGroups = kBlockN / 32;
  static constexpr int kUnits = kKeyGroups * (kHeadDimV / 16);

  Storage& smem;
  int const thread_idx;  // among the transposing threads
  Ring load_ring{smem.v_ring};
  Ring vt_ring{smem.transposed.vt_ring};
  typename Ring::Position load_pos, vt_pos;

  __device__ void run() {
    Tensor sV = make_tensor(make_smem_ptr(smem.vo.v.data()), typename Traits::SmemLayoutVLoad{});       // (N, Dv, stage)
    Tensor sVt = make_tensor(make_smem_ptr(smem.transposed.vt.data()), typename Traits::SmemLayoutVt{});  // (Dv, N, stage)
    int const lane = thread_idx % 32;
    int const warp = thread_idx / 32;
    int const word = lane % 8;     // 4 consecutive V^T columns of the 32-key group
    int const dim_quad = lane / 8;  // 4 of the unit's 16 dims
    // The keys that V^T columns 4 word + i hold (see the header).
    int keys[4];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) { keys[i] = 16 * (word / 4) + 2 * (word % 4) + (i & 1) + 8 * (i >> 1); }
    // The four quads of a warp store their 4 rows in rotated order, so that each store
    // instruction writes 4 consecutive V^T rows: 128 bytes in distinct banks.
    uint32_t select[4];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      uint32_t const byte = (j + dim_quad) & 3;
      select[j] = byte | ((4 + byte) << 4);
    }

    while (true) {
      load_ring.wait_full(load_pos);
      if (smem.transposed.v_stop[load_pos.stage]) { break; }
      vt_ring.wait_empty(vt_pos);
      for (int unit = warp; unit < kUnits; unit += kThreads / 32) {
        int const key0 = 32 * (unit % kKeyGroups);
        int const dim0 = 16 * (unit / kKeyGroups) + 4 * dim_quad;
        uint32_t x[4];  // 4 dims of one key each
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 4; ++i) {
          x[i] = *reinterpret_cast<uint32_t const*>(&sV(key0 + keys[i], dim0, load_pos.stage));
        }
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          int const dim = dim0 + ((j + dim_quad) & 3);
          uint32_t const low = __byte_perm(x[0], x[1], select[j]);
          uint32_t const high = __byte_perm(x[2], x[3], select[j]);
          *reinterpret_cast<uint32_t*>(&sVt(dim, key0 + 4 * word, vt_pos.stage)) = __byte_perm(low, high, 0x5410);
        }
      }
      // Written through the generic proxy, read by WGMMA through the async proxy.
      cutlass::arch::fence_view_async_shared();
      barrier_sync(Barrier::kTransposeV, kThreads);
      if (thread_idx == 0) {
        load_ring.release(load_pos);
        vt_ring.publish(vt_pos);
      }
      load_pos.advance();
      vt_pos.advance();
    }
  }
};

}  // namespace jax_fa3
