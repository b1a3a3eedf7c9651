// The backward tile table. One CTA owns kBlockN keys of one (query head, batch) and walks
// the query tiles of kBlockM rows that see them, keeping dK and dV in registers.
//
// Two ways to split that work between the two consumer warpgroups:
// - by keys (head dims 64, 128): each warpgroup owns 64 keys, so P^T and dS^T stay in its
//   registers as the A operands of dV += P^T·dO and dK += dS^T·Q; (head_dim + head_dim_v)/2
//   registers per thread hold dK and dV.
// - by head dim (256): 64 keys per CTA and each warpgroup owns half of dK's and dV's
//   columns, 128 registers per thread, as 64 keys of all 256 columns (256) would not fit.
//   Both warpgroups then need all of P^T and dS^T, which go through shared memory, and dQ
//   is added to global memory from registers (its 64 KB tile leaves no room in shared
//   memory next to K, V and two Q/dO stages).
#pragma once

namespace jax_fa3 {

// Whether a backward kernel applies the softcap. kOff and kOn compile it out or in; kRuntime
// branches on it in the step, which nearly doubles the step loop's code and adds spills to it
// (NOTES.md, sessions 18-19). Measured on the H200 against kRuntime: the unpacked backward
// +0.2-2.9% with kOff; packed forward+backward +12-25% at d64, +1-1.3% at d256, but -0.5 to
// -1.6% at d128 (BwdTileConfig::kPackedSoftcapCompiled).
enum class SoftcapMode { kOff, kOn, kRuntime };

// Compiled for 64, 128 and 256; 96 pads to 128 and 192 to 256 (dQ's head-dim split must
// keep whole 64-element swizzle atoms per warpgroup).
template <int kHeadDim>
struct BwdTileConfig {
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "compiled backward head dims: 64, 128, 256");
  static constexpr bool kSplitHeadDim = kHeadDim > 128;
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;  // query rows per step
  static constexpr int kBlockN = kSplitHeadDim ? 64 : 128;   // keys per CTA
  // Q/dO ring depth: a third stage fits at head dim 128 only. With two, a stage is
  // refilled one step ahead of its use, and Q/dO arrive late under the dQ reduce traffic.
  static constexpr int kStages = kHeadDim == 128 ? 3 : 2;
  static constexpr int kConsumerWarpgroups = 2;
  // dQ from registers with 16-byte atomic adds at head dim 256; else through shared memory
  // and a writer warp's bulk reduce-add (atomics measured 17% slower at d128: NOTES.md).
  static constexpr bool kDQAtomics = kSplitHeadDim;
  // Persistent CTAs (see KeyTileOrder) where the tile loop's registers fit: at head dim 64
  // they make the mainloop spill (300 B, measured 3% slower), so there one CTA per tile.
  static constexpr bool kPersistent = kHeadDim != 64;
  // The packed (segment-id) kernel in two, with and without the softcap (see SoftcapMode).
  static constexpr bool kPackedSoftcapCompiled = kHeadDim != 128;
};

// The preprocess kernel (bwd/preprocess.h): 256 threads, each reading 16 bytes of dO and of
// O per row: a row of kHeadDimV elements takes kHeadDimV / 8 lanes, so a warp covers
// 32 / (kHeadDimV / 8) rows at once.
template <int kHeadDimV>
struct PreprocessShape {
  static constexpr int kVector = 8;  // 16-byte loads of 16-bit elements
  static constexpr int kLanesPerRow = kHeadDimV / kVector;
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a row must fit in one warp");
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
};

// The preprocess blocks per (batch, head): they cover seqlen_q rounded up to whole query tiles.
template <int kHeadDim>
constexpr long long preprocess_blocks(long long seqlen_q) {
  constexpr int kBlockM = BwdTileConfig<kHeadDim>::kBlockM;
  static_assert(kBlockM % PreprocessShape<kHeadDim>::kRowsPerBlock == 0);
  return (seqlen_q + kBlockM - 1) / kBlockM * kBlockM / PreprocessShape<kHeadDim>::kRowsPerBlock;
}

}  // namespace jax_fa3
