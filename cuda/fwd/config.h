// The forward tile tables, one row per head dim: 16-bit and FP8 inputs. kBlockM is 64 query
// rows per consumer warpgroup; kBlockN is bounded by registers (one fp32 score tile, its
// probabilities and the output accumulator live at once) and by shared memory.
#pragma once

namespace jax_fa3 {

// Ablation builds (CMake JAX_FA3_FWD_ABLATION) switch off one of the paper's overlaps.
#if defined(JAX_FA3_ABLATE_PINGPONG)
constexpr bool kAblatePingpong = true;
#else
constexpr bool kAblatePingpong = false;
#endif
#if defined(JAX_FA3_ABLATE_INTRA_WG_OVERLAP)
constexpr bool kAblateIntraWarpgroupOverlap = true;
#else
constexpr bool kAblateIntraWarpgroupOverlap = false;
#endif

// kShortMasked: the masked row's tile for calls with few keys (the table's "short masked"
// column); it changes kBlockM only.
template <int kElementBytes, int kHeadDim, bool kHasWindow, bool kShortMasked = false>
struct FwdTileConfig;

#define JAX_FA3_FWD_TILE(HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_N_WINDOW, PINGPONG, DYNAMIC, SHORT_KEYS, \
                         SHORT_MASKED_KEYS)                                                \
  template <bool kHasWindow, bool kShortMasked>                                           \
  struct FwdTileConfig<2, HEAD_DIM, kHasWindow, kShortMasked> {                           \
    static constexpr int kBlockM = kHasWindow && kShortMasked ? 128 : BLOCK_M;            \
    static constexpr int kBlockN = kHasWindow ? BLOCK_N_WINDOW : BLOCK_N;                 \
    static constexpr int kStages = 2;                                                     \
    /* Two warpgroups take turns on the tensor cores; above 128 the output */            \
    /* accumulator leaves no registers for it. */                                         \
    static constexpr bool kPingpong = PINGPONG && !kAblatePingpong;                       \
    /* Softmax of S[n] under the in-flight P·V[n+1] of the same warpgroup. */             \
    static constexpr bool kIntraWarpgroupOverlap = !kAblateIntraWarpgroupOverlap;         \
    /* Large accumulators rescale under the next QK^T rather than after P·V. */           \
    static constexpr bool kRescaleOBeforeGemm = HEAD_DIM > 128;                           \
    /* Tiles claimed from a counter also without a mask window (else round-robin). */     \
    static constexpr bool kDynamicScheduler = DYNAMIC;                                    \
    /* Unmasked calls with at most this many keys run the window kernel (0: never). */   \
    static constexpr int kShortKeysWindowKernel = SHORT_KEYS;                             \
    /* Masked calls with at most this many keys run 128-row tiles (0: never). */          \
    static constexpr int kShortMaskedKeys = SHORT_MASKED_KEYS;                            \
    /* Exp2 all on MUFU: every share on the FMA pipe measured slower (FP8 table). */     \
    static constexpr int kExp2OnFmaPer8 = 0;                                              \
  };

// Dynamic scheduler without a window (windows always use it): measured on the H200 against
// round-robin (benchmarks/NOTES.md, session 11), non-causal TFLOP/s: d64 +3% from 8k,
// d256 +5-7% from 4k (-5% at 512), d128 -2 to -3.5% up to 4k; 96 and 192 unmeasured.
// Short keys: unmasked calls with at most that many keys run the window kernel, under a
// window wider than the sequences (run_fwd in fwd/launch.h). Measured at d128 (NOTES.md,
// session 12): its 128-key tiles and dynamic scheduler +2.6% at 512, +2.3% at 1k, +0.8-1.4%
// at 2k-4k against the 176-key tiles, even from 8k; other head dims unmeasured.
// Short masked: causal or local calls with at most that many keys take 128-row tiles where
// the table has 192. Measured at d64 (NOTES.md, session 14): causal +7-9% at 512-1k, -4% at
// 2k and more beyond (three warpgroups sharing each K/V tile win once rows are many).
//               head dim  M    N   N (causal/local)  pingpong  dynamic scheduler  short keys  short masked
JAX_FA3_FWD_TILE(64,       192, 128, 128,             true,     true,              0,          1024)
JAX_FA3_FWD_TILE(96,       128, 144, 128,             true,     false,             0,          0)
JAX_FA3_FWD_TILE(128,      128, 176, 128,             true,     false,             4096,       0)
JAX_FA3_FWD_TILE(192,      128, 112, 96,              false,    false,             0,          0)
JAX_FA3_FWD_TILE(256,      128, 80,  64,              false,    true,              0,          0)

#undef JAX_FA3_FWD_TILE

// FP8 (e4m3): half the bytes per score's probability, so longer key tiles fit. One kBlockN per
// head dim whatever the mask: per-block K descale factors (fp8_attention) cover one key tile.
// V is transposed on chip from a staging buffer (fwd/transpose_v.h).
// Dynamic scheduler without a window: measured on the H200 against round-robin (NOTES.md,
// session 13), non-causal TFLOP/s from 8k: d64 +2-3%, d128 +2%, d256 +2-2.5% (at 2k: +4%, +3%,
// -0.5%).
// Exp2 on FMA: of every 8 score columns, those whose exp2 runs on the FMA pipe instead of
// MUFU (common/exp2_on_fma.h). Measured on the H200 (NOTES.md, session 13): at d128, where
// MUFU paces the softmax, 1 in 8 gives +6-7% from 8k (+3-4% at 2k), 2 in 8 -6%; at d64 and
// d256, and in the 16-bit kernels, any share loses (the extra instructions cost issue slots).
// Its cheaper form (rounding down, no FMUL; session 14) added +0.8-1.6% at d128.
#define JAX_FA3_FWD_FP8_TILE(HEAD_DIM, BLOCK_M, BLOCK_N, DYNAMIC, EXP2_FMA)              \
  template <bool kHasWindow, bool kShortMasked>                                           \
  struct FwdTileConfig<1, HEAD_DIM, kHasWindow, kShortMasked> {                           \
    static constexpr int kBlockM = BLOCK_M;                                               \
    static constexpr int kBlockN = BLOCK_N;                                               \
    static constexpr int kStages = 2;                                                     \
    static constexpr bool kPingpong = !kAblatePingpong;                                   \
    static constexpr bool kIntraWarpgroupOverlap = !kAblateIntraWarpgroupOverlap;         \
    static constexpr bool kRescaleOBeforeGemm = false;                                    \
    static constexpr bool kDynamicScheduler = DYNAMIC;                                    \
    static constexpr int kShortKeysWindowKernel = 0;                                      \
    static constexpr int kShortMaskedKeys = 0;                                            \
    static constexpr int kExp2OnFmaPer8 = EXP2_FMA;                                       \
  };

//                    head dim  M    N    dynamic scheduler  exp2 on FMA
JAX_FA3_FWD_FP8_TILE(64,       192, 160, true,              0)
JAX_FA3_FWD_FP8_TILE(128,      128, 224, true,              1)
JAX_FA3_FWD_FP8_TILE(256,      128, 128, true,              0)

#undef JAX_FA3_FWD_FP8_TILE

}  // namespace jax_fa3
