// The per-(batch, head) largest attention logit (for QK-clip): an atomic maximum over the
// query tiles. Floats are stored as order-preserving uint32 keys, so the maximum is one
// integer atomicMax and a zeroed buffer means "no score yet" (below every key of a float).
// jax_fa3/primitives.py decodes the keys.
#pragma once

#include <cstdint>

namespace jax_fa3 {

// Flip the sign bit of non-negative floats and every bit of negative ones: the unsigned
// order of the keys is then the order of the floats.
__device__ __forceinline__ uint32_t ordered_key(float x) {
  uint32_t const bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Called by every lane of a warp with the warp's maximum; lane 0 records it.
__device__ __forceinline__ void record_max_logit(uint32_t* slot, float warp_max) {
  if (threadIdx.x % 32 == 0 && warp_max > -INFINITY) { atomicMax(slot, ordered_key(warp_max)); }
}

}  // namespace jax_fa3
