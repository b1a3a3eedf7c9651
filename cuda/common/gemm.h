// One warpgroup-wide tile product on the tensor cores (WGMMA).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

namespace jax_fa3 {

using namespace cute;

// c (+)= a · b over every k-block, issued asynchronously and committed as one batch.
// kWaitBatches >= 0 then waits until at most that many batches are still in flight;
// -1 returns at once, leaving the caller to wait (that is how softmax hides under it).
// a is either smem descriptors (SS) or a register fragment (RS).
template <bool kZeroInit, int kWaitBatches, class TiledMma, class TensorA, class TensorB, class TensorC>
CUTE_DEVICE void warpgroup_gemm(TiledMma& tiled_mma, TensorA const& a, TensorB const& b, TensorC& c) {
  constexpr bool kAInRegisters = !is_same_v<typename TensorA::iterator, GMMA::DescriptorIterator>;
  // The fences keep the compiler from moving register reads/writes of the operands
  // across the asynchronous WGMMA.
  if constexpr (kAInRegisters) { warpgroup_fence_operand(const_cast<TensorA&>(a)); }
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) { tiled_mma.accumulate_ = GMMA::ScaleOut::Zero; }
  CUTLASS_PRAGMA_UNROLL
  for (int k_block = 0; k_block < size<2>(a); ++k_block) {
    cute::gemm(tiled_mma, a(_, _, k_block), b(_, _, k_block), c);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWaitBatches >= 0) { warpgroup_wait<kWaitBatches>(); }
  warpgroup_fence_operand(c);
  if constexpr (kAInRegisters) { warpgroup_fence_operand(const_cast<TensorA&>(a)); }
}

// ptxas schedules a WGMMA wait as early as its data dependencies allow, so register-only
// work meant to run under the in-flight WGMMA (the softmax) can sink behind the wait.
// A store of `value` that never executes (`never` is a runtime value the compiler cannot
// fold) ends the basic block, and everything `value` depends on stays ahead of the wait.
template <class T>
CUTE_DEVICE void finish_before_next_wait(T value, bool never, T* sink) {
  if (never) { *sink = value; }
}

}  // namespace jax_fa3
