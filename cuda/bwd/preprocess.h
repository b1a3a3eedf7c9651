// Backward preprocess: per query row, dpsum = rowsum(dO ∘ O) and lse in log2 units. Rows
// past seqused_q (or past seqlen_q, up to the rounded length) and rows that saw no key
// get lse = +inf, which makes every probability of the row exp2(-inf) = 0 in the main
// kernel: such rows contribute nothing to any gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>
#include <cutlass/cutlass.h>

#include "common/mask.h"

namespace jax_fa3 {

struct BwdPreprocessParams {
  void const* dout;
  void const* out;
  float const* lse;  // [batch, heads, seqlen_q]
  float* dpsum;      // [batch, heads, seqlen_q_rounded]
  float* lse_log2;   // [batch, heads, seqlen_q_rounded]
  int const* seqused_q;
  int64_t o_row_stride, o_head_stride, o_batch_stride;
  int seqlen_q, seqlen_q_rounded, heads, batch;
};

// Each thread reads 16 bytes of dO and of O per row: a row of kHeadDimV elements takes
// kHeadDimV / 8 lanes, so a warp covers 32 / (kHeadDimV / 8) rows at once.
template <int kHeadDimV>
struct PreprocessShape {
  static constexpr int kVector = 8;  // 16-byte loads of 16-bit elements
  static constexpr int kLanesPerRow = kHeadDimV / kVector;
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a row must fit in one warp");
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
};

// grid (seqlen_q_rounded / kRowsPerBlock, heads, batch), 256 threads.
template <class Element, int kHeadDimV>
__global__ void __launch_bounds__(PreprocessShape<kHeadDimV>::kThreads) bwd_preprocess_kernel(BwdPreprocessParams const p) {
  using Shape = PreprocessShape<kHeadDimV>;
  static_assert(sizeof(Element) == 2);
  int const lane_in_row = threadIdx.x % Shape::kLanesPerRow;
  int const row = blockIdx.x * Shape::kRowsPerBlock + threadIdx.x / Shape::kLanesPerRow;
  int const head = blockIdx.y;
  // A grid's z dimension stops at 65535: more batch rows than that take turns.
  for (int batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
    int const used_rows = used_length(p.seqused_q, batch, p.seqlen_q);
    float lse = -INFINITY, sum = 0.f;
    if (row < used_rows) {
      int64_t const offset = batch * p.o_batch_stride + row * p.o_row_stride + head * p.o_head_stride +
                             lane_in_row * Shape::kVector;
      // Rows are 16-byte aligned: dO is read by TMA, which requires it, and O has its layout.
      uint4 const dout_raw = *reinterpret_cast<uint4 const*>(static_cast<Element const*>(p.dout) + offset);
      uint4 const out_raw = *reinterpret_cast<uint4 const*>(static_cast<Element const*>(p.out) + offset);
      Element const* dout = reinterpret_cast<Element const*>(&dout_raw);
      Element const* out = reinterpret_cast<Element const*>(&out_raw);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < Shape::kVector; ++i) { sum += float(dout[i]) * float(out[i]); }
      lse = p.lse[(int64_t(batch) * p.heads + head) * p.seqlen_q + row];
    }
    CUTLASS_PRAGMA_UNROLL
    for (int width = Shape::kLanesPerRow / 2; width > 0; width /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, width); }
    if (lane_in_row == 0) {
      int64_t const stat = (int64_t(batch) * p.heads + head) * p.seqlen_q_rounded + row;
      p.dpsum[stat] = sum;
      p.lse_log2[stat] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
    }
  }
}

}  // namespace jax_fa3
