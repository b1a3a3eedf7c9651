// Backward preprocess: per query row, dpsum = rowsum(dO ∘ O) and lse in log2 units. Rows
// past seqused_q (or past seqlen_q, up to the rounded length) and rows that saw no key
// get lse = +inf, which makes every probability of the row exp2(-inf) = 0 in the main
// kernel: such rows contribute nothing to any gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

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
  int seqlen_q, seqlen_q_rounded, heads;
};

constexpr int kPreprocessRowsPerBlock = 8;  // one warp per row

// grid (seqlen_q_rounded / 8, heads, batch), 256 threads.
template <class Element, int kHeadDimV>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(BwdPreprocessParams const p) {
  int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int const row = blockIdx.x * kPreprocessRowsPerBlock + warp;
  int const head = blockIdx.y, batch = blockIdx.z;
  int const used_rows = used_length(p.seqused_q, batch, p.seqlen_q);
  int64_t const stat = (int64_t(batch) * p.heads + head) * p.seqlen_q_rounded + row;
  float lse = -INFINITY, sum = 0.f;
  if (row < used_rows) {
    int64_t const offset = batch * p.o_batch_stride + row * p.o_row_stride + head * p.o_head_stride;
    Element const* dout = static_cast<Element const*>(p.dout) + offset;
    Element const* out = static_cast<Element const*>(p.out) + offset;
    for (int d = lane; d < kHeadDimV; d += 32) { sum += float(dout[d]) * float(out[d]); }
    for (int width = 16; width > 0; width /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, width); }
    lse = p.lse[(int64_t(batch) * p.heads + head) * p.seqlen_q + row];
  }
  if (lane == 0) {
    p.dpsum[stat] = sum;
    p.lse_log2[stat] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
  }
}

}  // namespace jax_fa3
