// Tile shapes and shared-memory budget of the decode kernel, per (dtype, head dim).
//
// Design (the numbers are for the H200: 132 SMs, ~4.8 TB/s HBM; see benchmarks/NOTES.md):
// decode reads the whole K/V cache once per token and does ~1 flop per byte, so the only
// goal is bytes in flight. By Little's law ~4.8 TB/s x ~1.5 us of loaded latency is ~7 MB,
// ~55 KB per SM. Each warp runs its own cp.async ring of kStages stages of kWarpKeys keys
// of K and V (no CTA-wide barrier in the main loop), so an SM holding 8 such warps keeps up
// to 8 x (kStages - 1) stages, 128 KB at d128, in flight. The 16 query rows of a CTA (the
// query heads of one KV head times the query tokens, "GQA packing") share every K/V byte.
#pragma once

#include "decode/params.h"

namespace jax_fa3::decode {

template <class Element_, int kHeadDim_>
struct Config {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // the compiled width; a smaller multiple of 8 runs zero-padded
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Keys a warp consumes per stage, in k16 slices of P·V: 16 at d128/d256; 32 at d64, whose
  // rows are half as long, so that a step's fixed costs (the waits, the row maxima and sums,
  // the rescale) are paid per 8 KB of K and V at every head dim up to 128.
  static constexpr int kWarpKeys = kHeadDim <= 64 ? 32 : 16;
  static constexpr int kBlockN = kWarps * kWarpKeys;  // keys per CTA per main-loop step
  static constexpr int kChunks = kHeadDim / 8;        // 16-byte chunks per row
  static constexpr int kTileElems = kWarpKeys * kHeadDim;  // one of K or V, per warp and stage
  // 8 KB (K + V) per warp and stage at d64 and d128, 16 KB at d256: 2, 2 and 1 CTAs fit on
  // an SM, and with two stages of each warp in flight an SM has 128 KB of reads in flight.
  static constexpr int kStages = 3;
  static constexpr int kCtasPerSm = kHeadDim <= 128 ? 2 : 1;

  static_assert(kHeadDim % 64 == 0, "the swizzle permutes 8 chunks of 16 bytes");
  static_assert(32 % kChunks == 0, "a warp's 32 lanes copy whole rows (head_dim <= 256)");

  // Shared memory: Q [rows, kHeadDim]; per warp and stage K then V [kWarpKeys, kHeadDim]
  // (reused as the f32 [kWarps, rows, kHeadDim] exchange after the loop); row statistics.
  static constexpr int kQBytes = kDecodeRows * kHeadDim * int(sizeof(Element));
  static constexpr int kKvBytes = kWarps * kStages * 2 * kTileElems * int(sizeof(Element));
  static constexpr int kExchangeBytes = kWarps * kDecodeRows * kHeadDim * 4;
  static constexpr int kStatsBytes = 2 * kWarps * kDecodeRows * 4;
  static_assert(kExchangeBytes <= kKvBytes, "the warps' outputs are exchanged in the K/V buffers");
  static constexpr int kSmemBytes = kQBytes + kKvBytes + kStatsBytes;
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "shared memory per SM");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows, kHeadDim] tile. The chunk
// index is XORed with row % 8 so that ldmatrix's 8 row addresses hit 8 different bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

}  // namespace jax_fa3::decode
