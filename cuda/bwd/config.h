// The backward tile table. One CTA owns kBlockN keys of one (query head, batch) and walks
// the query tiles of kBlockM rows that see them. Each consumer warpgroup owns 64 keys and
// keeps their dK and dV accumulators in registers for the whole walk, so
// (head_dim + head_dim_v) / 2 registers per thread go to them.
#pragma once

namespace jax_fa3 {

// Head dims are compiled for 64 and 128: the two warpgroups split dQ's head dim in halves,
// which must align with the shared-memory swizzle atoms (96 would split a 32-wide atom;
// Python pads 96 to the 128 kernel).
template <int kHeadDim>
struct BwdTileConfig {
  static_assert(kHeadDim <= 128, "the key-owning backward layout holds dK and dV for head dims <= 128");
  static constexpr int kBlockM = 64;   // query rows per step
  static constexpr int kBlockN = 128;  // keys per CTA: 64 per consumer warpgroup
  static constexpr int kStages = 2;    // Q/dO ring depth
};

}  // namespace jax_fa3
