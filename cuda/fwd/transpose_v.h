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

// Byte offsets (within one stage) of what a lane reads and writes. A warp moves one unit per
// step: 32 keys x 16 dims, a 4x4-byte block per lane: 4 words of V (4 keys, 4 dims each) in,
// 4 words of V^T (4 dims, 4 keys each) out. The swizzled layouts are linear in each of the
// lane part and the unit part (neither carries into the other), so a lane adds its
// precomputed part to the unit's and applies the swizzle once.
template <class Traits>
struct VTransposeAddressing {
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static_assert(sizeof(typename Traits::Element) == 1, "byte offsets: FP8 only");
  static_assert(kBlockN % 32 == 0 && kHeadDimV % 16 == 0);
  static constexpr int kKeyGroups = kBlockN / 32;
  static constexpr int kUnits = kKeyGroups * (kHeadDimV / 16);

  using LoadLayout = decltype(take<0, 2>(typename Traits::SmemLayoutVLoad{}));  // (N, Dv)
  using StoreLayout = decltype(take<0, 2>(typename Traits::SmemLayoutVt{}));    // (Dv, N)
  static constexpr int kStageBytes = cosize_v<LoadLayout>;
  static_assert(cosize_v<StoreLayout> == kStageBytes);

  template <class L>
  CUTE_HOST_DEVICE static int linear(L, int row, int col) {
    return get_nonswizzle_portion(L{})(row, col);
  }
  template <class L>
  CUTE_HOST_DEVICE static int swizzled(L, int offset) {
    return get_swizzle_portion(L{})(offset);
  }

  // The V^T column 4 word + i holds this key of the 32-key group (see the header).
  CUTE_HOST_DEVICE static int key_of(int word, int i) { return 16 * (word / 4) + 2 * (word % 4) + (i & 1) + 8 * (i >> 1); }
  // The four quads of a warp write their 4 rows in rotated order, so that each store
  // instruction writes 4 consecutive V^T rows: 128 bytes in distinct banks.
  CUTE_HOST_DEVICE static int rotated_row(int dim_quad, int j) { return (j + dim_quad) & 3; }

  CUTE_HOST_DEVICE static int lane_load(int lane) { return linear(LoadLayout{}, key_of(lane % 8, 0), 4 * (lane / 8)); }
  CUTE_HOST_DEVICE static int lane_store(int lane) { return linear(StoreLayout{}, 4 * (lane / 8), 4 * (lane % 8)); }
  CUTE_HOST_DEVICE static int unit_load(int unit) {
    return linear(LoadLayout{}, 32 * (unit % kKeyGroups), 16 * (unit / kKeyGroups));
  }
  CUTE_HOST_DEVICE static int unit_store(int unit) {
    return linear(StoreLayout{}, 16 * (unit / kKeyGroups), 32 * (unit % kKeyGroups));
  }
  // Key i - key 0 of a lane, and one V^T row, in linear offsets.
  CUTE_HOST_DEVICE static int key_step(int i) { return linear(LoadLayout{}, (i & 1) + 8 * (i >> 1), 0) - linear(LoadLayout{}, 0, 0); }
  CUTE_HOST_DEVICE static int row_step(int rows) { return linear(StoreLayout{}, rows, 0) - linear(StoreLayout{}, 0, 0); }

  CUTE_HOST_DEVICE static int load_offset(int lane_part, int unit_part, int i) {
    return swizzled(LoadLayout{}, lane_part + unit_part + key_step(i));
  }
  CUTE_HOST_DEVICE static int store_offset(int lane_part, int unit_part, int rows) {
    return swizzled(StoreLayout{}, lane_part + unit_part + row_step(rows));
  }
};

template <class Traits>
struct VTransposer {
  using Storage = typename Traits::SharedStorage;
  using Ring = TmaRing<Traits::kStages>;
  using Addressing = VTransposeAddressing<Traits>;
  static constexpr int kWarps = Traits::kTransposeThreads / 32;

  Storage& smem;
  int const thread_idx;  // among the transposing threads
  Ring load_ring{smem.v_ring};
  Ring vt_ring{smem.transposed.vt_ring};
  typename Ring::Position load_pos, vt_pos;

  static __device__ uint32_t load_shared(uint32_t address) {
    uint32_t value;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(value) : "r"(address));
    return value;
  }
  static __device__ void store_shared(uint32_t address, uint32_t value) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(address), "r"(value));
  }

  __device__ void run() {
    uint32_t const v_base = cast_smem_ptr_to_uint(smem.vo.v.data());
    uint32_t const vt_base = cast_smem_ptr_to_uint(smem.transposed.vt.data());
    int const lane = thread_idx % 32;
    int const dim_quad = lane / 8;
    int const lane_load = Addressing::lane_load(lane);
    int const lane_store = Addressing::lane_store(lane);

    while (true) {
      load_ring.wait_full(load_pos);
      if (smem.transposed.v_stop[load_pos.stage]) { break; }
      vt_ring.wait_empty(vt_pos);
      uint32_t const v_stage = v_base + load_pos.stage * Addressing::kStageBytes;
      uint32_t const vt_stage = vt_base + vt_pos.stage * Addressing::kStageBytes;
      for (int unit = thread_idx / 32; unit < Addressing::kUnits; unit += kWarps) {
        int const unit_load = Addressing::unit_load(unit);
        int const unit_store = Addressing::unit_store(unit);
        uint32_t x[4];  // 4 dims of one key each
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 4; ++i) { x[i] = load_shared(v_stage + Addressing::load_offset(lane_load, unit_load, i)); }
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          int const row = Addressing::rotated_row(dim_quad, j);
          uint32_t const select = row | ((4 + row) << 4);  // byte `row` of each word
          uint32_t const low = __byte_perm(x[0], x[1], select);
          uint32_t const high = __byte_perm(x[2], x[3], select);
          store_shared(vt_stage + Addressing::store_offset(lane_store, unit_store, row), __byte_perm(low, high, 0x5410));
        }
      }
      // Written through the generic proxy, read by WGMMA through the async proxy.
      cutlass::arch::fence_view_async_shared();
      barrier_sync(Barrier::kTransposeV, Traits::kTransposeThreads);
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
