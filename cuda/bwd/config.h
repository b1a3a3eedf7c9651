// The backward tile table. One CTA owns kBlockN keys of one (query head, batch) and walks
// the query tiles of kBlockM rows that see them. Each consumer warpgroup owns 64 keys and
// keeps their dK and dV accumulators in registers for the whole walk, so
// (head_dim + head_dim_v) / 2 registers per thread go to them.
#pragma once

namespace jax_fa3 {

// Head dims are compiled for 64 and 128. dQ = dS·K is split between the warpgroups along
// its rows (queries) when there are 64 per warpgroup, else along the head dim; either way
// each part must be whole 64-element swizzle atoms (so 96 pads to the 128 kernel).
template <int kHeadDim>
struct BwdTileConfig {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "compiled backward head dims: 64, 128");
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;  // query rows per step
  static constexpr int kBlockN = 128;  // keys per CTA: 64 per consumer warpgroup
  static constexpr int kStages = 2;    // Q/dO ring depth
};

}  // namespace jax_fa3
