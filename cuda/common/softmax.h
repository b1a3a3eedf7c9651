// Online softmax over WGMMA accumulator tiles, in fp32 with exp2.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

#include "common/exp2_on_fma.h"
#include "common/layouts.h"
#include "common/ptx.h"

namespace jax_fa3 {

using namespace cute;

// max(a, b); with kKeepNan, NaN if either is (fmaxf returns the other).
template <bool kKeepNan>
__device__ __forceinline__ float max_of(float a, float b) {
  if constexpr (kKeepNan) {
    float y;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
    return y;
  } else {
    return fmaxf(a, b);
  }
}

// The four threads of a quad hold the same rows (acc_rows_cols), so row reductions
// finish with two butterfly shuffles.
template <bool kKeepNan = false>
__device__ __forceinline__ float quad_max(float x) {
  x = max_of<kKeepNan>(x, __shfl_xor_sync(0xffffffff, x, 1));
  return max_of<kKeepNan>(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// scores <- tanh(scores * prescale); the softcap itself is folded into the exp2 scale.
template <class Engine, class Layout>
__device__ __forceinline__ void apply_softcap(Tensor<Engine, Layout>& scores, float prescale) {
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(scores); ++i) { scores(i) = tanh_approx(scores(i) * prescale); }
}

// Multiplies every row of an accumulator tile by its factor.
template <int kRows, class Engine, class Layout>
__device__ __forceinline__ void scale_rows(Tensor<Engine, Layout>& acc, float const (&factor)[kRows]) {
  Tensor rows = make_tensor(acc.data(), acc_rows_cols(acc.layout()));
  static_assert(decltype(size<0>(rows))::value == kRows);
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(rows); ++c) { rows(r, c) *= factor[r]; }
  }
}

// Running row maximum and row sum of exp over the key tiles seen so far. Scores are kept
// raw; scale_log2 turns them into log2 units, so each probability costs one FFMA + one EX2.
//
// kFp8: the scale may change from key tile to key tile (per-block descale factors), so the
// running maximum is kept in log2 units, and the probabilities come out as
// exp2(x - max + kFp8Offset) in (0, 256], which uses e4m3's range (max 448) rather than
// rounding small probabilities to its subnormals. The offset cancels in the normalisation;
// the lse and the max logit take it back out.
//
// kExp2OnFmaPer8: of every 8 columns of a thread's row, how many take exp2_on_fma, the first
// k of each 8 (other spreads measured no better: NOTES.md, session 13).
template <int kRows, bool kFp8 = false, int kExp2OnFmaPer8 = 0>
struct OnlineSoftmax {
  static constexpr float kFp8Offset = 8.f;
  float row_max[kRows];  // raw scores; kFp8: log2 units
  float row_sum[kRows];  // per-thread partial sums, reduced across the quad in finalize()
  float scale_log2;
  // exp2_on_fma does not keep NaN, so with a share on it a NaN score makes its row's
  // maximum NaN instead (every exp2 of the row, MUFU's too, is then NaN).
  static constexpr bool kNanMax = kExp2OnFmaPer8 > 0;

  // The maximum of row r's columns (-inf when none is a number) through kMaxChains
  // independent chains of fmaxf: exact, max being associative, and a chain kMaxChains
  // times shorter.
  static constexpr int kMaxChains = 4;
  template <class Rows>
  __device__ __forceinline__ static float row_max_of(Rows const& s, int r) {
    constexpr int kCols = decltype(size<1>(s))::value;
    static_assert(kCols % kMaxChains == 0);
    float chain[kMaxChains];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kMaxChains; ++i) { chain[i] = -INFINITY; }  // as a NaN-only row: -inf
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) { chain[c % kMaxChains] = max_of<kNanMax>(chain[c % kMaxChains], s(r, c)); }
    CUTLASS_PRAGMA_UNROLL
    for (int width = kMaxChains / 2; width > 0; width /= 2) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < width; ++i) { chain[i] = max_of<kNanMax>(chain[i], chain[i + width]); }
    }
    return chain[0];
  }

  // Folds a tile of scores into the running state and overwrites it with exp2 of the
  // shifted scores (the unnormalised probabilities). o_scale receives the factor that
  // brings the output accumulated so far onto the new maximum.
  template <bool kFirst, class Engine, class Layout>
  __device__ __forceinline__ void update(Tensor<Engine, Layout>& acc_s, float (&o_scale)[kRows]) {
    Tensor s = make_tensor(acc_s.data(), acc_rows_cols(acc_s.layout()));
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float new_max;  // this tile's maximum; kFp8 folds in the running one below, in log2 units
      if constexpr (kFp8) {
        new_max = row_max_of(s, r);
      } else {
        new_max = kFirst ? -INFINITY : row_max[r];
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < size<1>(s); ++c) { new_max = max_of<kNanMax>(new_max, s(r, c)); }
      }
      new_max = quad_max<kNanMax>(new_max);
      float shift;
      if constexpr (kFp8) {
        new_max *= scale_log2;  // scale_log2 > 0 keeps the order (and -inf)
        if (!kFirst) { new_max = max_of<kNanMax>(new_max, row_max[r]); }
        float const top = new_max == -INFINITY ? 0.f : new_max;
        o_scale[r] = kFirst ? 1.f : exp2f(row_max[r] - top);
        shift = top - kFp8Offset;
      } else {
        // A row that has seen only masked keys keeps max = -inf; shifting by 0 instead
        // keeps exp2 at 0 rather than NaN.
        shift = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        o_scale[r] = kFirst ? 1.f : exp2f(row_max[r] * scale_log2 - shift);
      }
      row_max[r] = new_max;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        float const x = s(r, c) * scale_log2 - shift;
        s(r, c) = c % 8 < kExp2OnFmaPer8 ? exp2_on_fma(x) : exp2f(x);
        sum += s(r, c);
      }
      row_sum[r] = kFirst ? sum : row_sum[r] * o_scale[r] + sum;
    }
  }

  // The maximum in log2 units that the row sum is relative to (-inf for a row that saw no key).
  __device__ __forceinline__ float sum_reference_log2(int r) const {
    if constexpr (kFp8) {
      return row_max[r] - kFp8Offset;
    } else {
      return row_max[r] * scale_log2;
    }
  }

  // o_scale receives the factor that normalises the output accumulated so far, and lse the
  // natural-log sum of exp of the scaled scores. An attention sink (a scaled score; -inf for
  // none) is one more logit with no value: it enters the sum here only, so the tile loop is
  // the same with or without it. A row that saw no key gets o_scale 0 and lse = the sink
  // exactly (-inf without one).
  __device__ __forceinline__ void finalize(float (&o_scale)[kRows], float (&lse)[kRows],
                                           float sink = -INFINITY) {
    float const sink_log2 = sink * float(M_LOG2E);
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const sum = quad_sum(row_sum[r]);
      float const max_log2 = sum_reference_log2(r);  // -inf for a row that saw no key
      float const top = fmaxf(max_log2, sink_log2);
      bool const keyless = max_log2 == -INFINITY;
      float const keys_weight = exp2f(max_log2 - top);  // 0 for a row that saw no key
      float const total = sum * keys_weight + exp2f(sink_log2 - top);
      o_scale[r] = keyless || sum != sum ? 0.f : keys_weight / total;
      lse[r] = keyless ? sink : sum != sum ? -INFINITY : (top + log2f(total)) * float(M_LN2);
    }
  }

  // The largest scaled score of the rows flagged in `counted` (-inf if none), reduced over
  // the warp: every lane returns it.
  __device__ __forceinline__ float warp_max_score(bool const (&counted)[kRows]) const {
    float m = -INFINITY;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) { m = counted[r] ? fmaxf(m, row_max[r]) : m; }
    CUTLASS_PRAGMA_UNROLL
    for (int width = 16; width > 0; width /= 2) { m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, width)); }
    return kFp8 ? m * float(M_LN2) : m * scale_log2 * float(M_LN2);
  }
};

}  // namespace jax_fa3
