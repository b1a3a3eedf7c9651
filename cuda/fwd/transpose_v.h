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
#include "common/ptx.h"

namespace jax_fa3 {

using namespace cute;

// Byte offsets (within one stage) of the rows a lane addresses. A warp moves one unit per
// step, 16 keys x 32 dims: one ldmatrix.x4.trans reads it as four 8x8 matrices of 16-bit
// pairs (keys x dim pairs), which leaves each lane two keys of a dim pair per register; one
// byte permute per output word pairs them with the keys 8 further on, which is V^T's key
// order; one stmatrix.x4 writes the four 8x8 results (even and odd dims).
//
// The swizzled layouts are linear in each of the lane part and the unit part, and the two
// use disjoint bits; a swizzle XORs bit fields, so offset = swizzle(lane) ^ swizzle(unit).
// Units are compile-time constants (VTransposer::transpose_units unrolls each warp's), so a
// unit's part is an immediate: the bits a lane part can hold are XORed, the others added.
template <class Traits>
struct VTransposeAddressing {
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDimV = Traits::kHeadDimV;
  static_assert(sizeof(typename Traits::Element) == 1, "byte offsets: FP8 only");
  static_assert(kBlockN % 16 == 0 && kHeadDimV % 32 == 0);
  static constexpr int kKeyGroups = kBlockN / 16;
  static constexpr int kUnits = kKeyGroups * (kHeadDimV / 32);

  using LoadLayout = decltype(take<0, 2>(typename Traits::SmemLayoutVLoad{}));  // (N, Dv)
  using StoreLayout = decltype(take<0, 2>(typename Traits::SmemLayoutVt{}));    // (Dv, N)
  static constexpr int kStageBytes = cosize_v<LoadLayout>;
  static_assert(cosize_v<StoreLayout> == kStageBytes);

  template <class L>
  CUTE_HOST_DEVICE static constexpr int linear(L, int row, int col) {
    return get_nonswizzle_portion(L{})(row, col);
  }
  template <class L>
  CUTE_HOST_DEVICE static constexpr int swizzled(L, int offset) {
    return get_swizzle_portion(L{})(offset);
  }

  // ldmatrix: lanes 8m..8m+7 address the rows of matrix m: keys 8 (m & 1) + r, dims 16 (m >> 1).
  CUTE_HOST_DEVICE static constexpr int lane_key(int lane) { return lane % 8 + 8 * ((lane / 8) & 1); }
  CUTE_HOST_DEVICE static constexpr int lane_load_dim(int lane) { return 16 * (lane / 16); }
  // stmatrix: row r of matrix m is dim 16 (m >> 1) + 2 r + ((m & 1) ^ (r >= 4)), 16 keys each:
  // its rows 4-7 take the other parity, so the 8 rows fall in 8 distinct bank groups.
  CUTE_HOST_DEVICE static constexpr int lane_store_dim(int lane) {
    int const r = lane % 8;
    return 16 * (lane / 16) + 2 * r + (((lane / 8) & 1) ^ (r >= 4));
  }
  // Rows 4-7 of each matrix come from lanes 16-31: they swap their even and odd words.
  CUTE_HOST_DEVICE static constexpr uint32_t even_select(int lane) { return lane >= 16 ? 0x7531 : 0x6420; }
  CUTE_HOST_DEVICE static constexpr uint32_t odd_select(int lane) { return lane >= 16 ? 0x6420 : 0x7531; }
  CUTE_HOST_DEVICE static constexpr int unit_key(int unit) { return 16 * (unit % kKeyGroups); }
  CUTE_HOST_DEVICE static constexpr int unit_dim(int unit) { return 32 * (unit / kKeyGroups); }

  // Swizzled lane parts (one per thread, computed once) and unit parts (constants).
  CUTE_HOST_DEVICE static constexpr uint32_t lane_load(int lane) {
    return swizzled(LoadLayout{}, linear(LoadLayout{}, lane_key(lane), lane_load_dim(lane)));
  }
  CUTE_HOST_DEVICE static constexpr uint32_t lane_store(int lane) {
    return swizzled(StoreLayout{}, linear(StoreLayout{}, lane_store_dim(lane), 0));
  }
  CUTE_HOST_DEVICE static constexpr uint32_t unit_load(int unit) {
    return swizzled(LoadLayout{}, linear(LoadLayout{}, unit_key(unit), unit_dim(unit)));
  }
  CUTE_HOST_DEVICE static constexpr uint32_t unit_store(int unit) {
    return swizzled(StoreLayout{}, linear(StoreLayout{}, unit_dim(unit), unit_key(unit)));
  }
  // Every bit that some lane's part (of the store offsets, or of the load offsets) sets.
  template <bool kStore>
  CUTE_HOST_DEVICE static constexpr uint32_t lane_bits() {
    uint32_t bits = 0;
    for (int lane = 0; lane < 32; ++lane) { bits |= kStore ? lane_store(lane) : lane_load(lane); }
    return bits;
  }
  // lane ^ unit, as (lane ^ the unit's bits that a lane part may hold) + the unit's other bits.
  CUTE_HOST_DEVICE static constexpr uint32_t combine(uint32_t lane_part, uint32_t unit_part, uint32_t lane_bits) {
    return (lane_part ^ (unit_part & lane_bits)) + (unit_part & ~lane_bits);
  }
  CUTE_HOST_DEVICE static constexpr uint32_t load_offset(uint32_t lane_part, int unit) {
    return combine(lane_part, unit_load(unit), lane_bits<false>());
  }
  CUTE_HOST_DEVICE static constexpr uint32_t store_offset(uint32_t lane_part, int unit) {
    return combine(lane_part, unit_store(unit), lane_bits<true>());
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

  // Warp `kWarp`'s units of one stage (kWarp, kWarp + kWarps, ...), unrolled: every unit's
  // offsets are constants, so a unit costs an ldmatrix, four permutes and an stmatrix plus
  // two or three integer operations.
  template <int kWarp>
  __device__ void transpose_units(uint32_t v_stage, uint32_t vt_stage, uint32_t lane_load, uint32_t lane_store,
                                  uint32_t even_select, uint32_t odd_select) const {
    constexpr int kCount = (Addressing::kUnits - kWarp + kWarps - 1) / kWarps;
    for_each(make_seq<kCount>{}, [&](auto i) {
      constexpr int unit = kWarp + decltype(i)::value * kWarps;
      uint32_t pairs[4];  // matrix m: keys 2q, 2q+1 (+ 8 (m & 1)) of dims 2p, 2p+1 (+ 16 (m >> 1))
      ldmatrix_x4_trans(v_stage + Addressing::load_offset(lane_load, unit), pairs);
      // V^T words: keys 2q, 2q+1, 2q+8, 2q+9 of dims 2p, 2p+1, 2p+16, 2p+17 (rows 4-7 of
      // each matrix: the odd dim first).
      uint32_t const even = __byte_perm(pairs[0], pairs[1], even_select);
      uint32_t const odd = __byte_perm(pairs[0], pairs[1], odd_select);
      uint32_t const even_high = __byte_perm(pairs[2], pairs[3], even_select);
      uint32_t const odd_high = __byte_perm(pairs[2], pairs[3], odd_select);
      stmatrix_x4(vt_stage + Addressing::store_offset(lane_store, unit), even, odd, even_high, odd_high);
    });
  }

  // One code path per warp, each with its own constants.
  template <int kWarp = 0>
  __device__ void transpose_stage(int warp, uint32_t v_stage, uint32_t vt_stage, uint32_t lane_load,
                                  uint32_t lane_store, uint32_t even_select, uint32_t odd_select) const {
    if constexpr (kWarp + 1 < kWarps) {
      if (warp != kWarp) {
        transpose_stage<kWarp + 1>(warp, v_stage, vt_stage, lane_load, lane_store, even_select, odd_select);
        return;
      }
    }
    transpose_units<kWarp>(v_stage, vt_stage, lane_load, lane_store, even_select, odd_select);
  }

  __device__ void run() {
    uint32_t const v_base = cast_smem_ptr_to_uint(smem.vo.v.data());
    uint32_t const vt_base = cast_smem_ptr_to_uint(smem.transposed.vt.data());
    int const warp = __shfl_sync(0xffffffff, thread_idx / 32, 0);  // warp-uniform, for the branch
    int const lane = thread_idx % 32;
    uint32_t const lane_load = Addressing::lane_load(lane);
    uint32_t const lane_store = Addressing::lane_store(lane);
    uint32_t const even_select = Addressing::even_select(lane);
    uint32_t const odd_select = Addressing::odd_select(lane);

    while (true) {
      // A staged V, or the producer's "done" (sent only once every load was transposed). Both
      // are mbarriers, so no flag in shared memory crosses between the warps.
      bool done = false;
      while (!load_ring.try_full(load_pos) && !done) {
        done = cutlass::arch::ClusterBarrier::test_wait(&smem.transposed.v_done, 0, 1);
      }
      if (done) { break; }
      vt_ring.wait_empty(vt_pos);
      transpose_stage(warp, v_base + load_pos.stage * Addressing::kStageBytes,
                      vt_base + vt_pos.stage * Addressing::kStageBytes, lane_load, lane_store, even_select,
                      odd_select);
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
