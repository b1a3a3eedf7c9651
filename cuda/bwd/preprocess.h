// Backward preprocess: per query row, dpsum = rowsum(dO ∘ O) and lse in log2 units. Rows
// past seqused_q (or past seqlen_q, up to the rounded length) and rows that saw no key
// get lse = +inf, which makes every probability of the row exp2(-inf) = 0 in the main
// kernel: such rows contribute nothing to any gradient.
//
// With attention sinks it also makes their gradient, which needs no key:
// dsinks[b, h] = -sum_i exp(sink - lse_i) * dpsum_i. Each block writes its part and
// bwd_sink_grad_kernel adds the parts in a fixed order (deterministic, no atomics).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>
#include <cutlass/cutlass.h>

#include "bwd/config.h"
#include "common/mask.h"

namespace jax_fa3 {

struct BwdPreprocessParams {
  void const* dout;
  void const* out;
  float const* lse;  // [batch, heads, seqlen_q]
  float* dpsum;      // [batch, heads, seqlen_q_rounded]
  float* lse_log2;   // [batch, heads, seqlen_q_rounded]
  float const* sinks;     // [batch, heads] or nullptr
  float* sink_partials;   // [batch, heads, gridDim.x] (with sinks)
  int const* seqused_q;
  int64_t o_row_stride, o_head_stride, o_batch_stride;
  int seqlen_q, seqlen_q_rounded, heads, batch;
};

// The sum over a block of one value per thread, returned to thread 0.
template <int kThreads>
__device__ __forceinline__ float block_sum(float x) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024);
  __shared__ float warp_sums[kThreads / 32];
  CUTLASS_PRAGMA_UNROLL
  for (int width = 16; width > 0; width /= 2) { x += __shfl_xor_sync(0xffffffff, x, width); }
  __syncthreads();  // warp_sums may still be read from the previous call
  if (threadIdx.x % 32 == 0) { warp_sums[threadIdx.x / 32] = x; }
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    CUTLASS_PRAGMA_UNROLL
    for (int w = 0; w < kThreads / 32; ++w) { total += warp_sums[w]; }
  }
  return total;
}

// grid (preprocess_blocks, min(heads, 65535), min(batch, 65535)), 256 threads.
template <class Element, int kHeadDimV>
__global__ void __launch_bounds__(PreprocessShape<kHeadDimV>::kThreads) bwd_preprocess_kernel(BwdPreprocessParams const p) {
  using Shape = PreprocessShape<kHeadDimV>;
  static_assert(sizeof(Element) == 2);
  int const lane_in_row = threadIdx.x % Shape::kLanesPerRow;
  int const row = blockIdx.x * Shape::kRowsPerBlock + threadIdx.x / Shape::kLanesPerRow;
  // A grid's y and z dimensions stop at 65535: more heads or batch rows than that take turns.
  for (int batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
    for (int head = blockIdx.y; head < p.heads; head += gridDim.y) {
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
      int64_t const head_index = int64_t(batch) * p.heads + head;
      if (lane_in_row == 0) {
        int64_t const stat = head_index * p.seqlen_q_rounded + row;
        p.dpsum[stat] = sum;
        p.lse_log2[stat] = lse == -INFINITY ? INFINITY : lse * float(M_LOG2E);
      }
      if (p.sinks) {
        // lse >= sink wherever the row is used (the sink is part of its sum), so the weight is in [0, 1].
        float const sink_weight = lse == -INFINITY ? 0.f : expf(p.sinks[head_index] - lse);
        float part = lane_in_row == 0 ? -sink_weight * sum : 0.f;
        float const total = block_sum<Shape::kThreads>(part);
        if (threadIdx.x == 0) { p.sink_partials[head_index * gridDim.x + blockIdx.x] = total; }
      }
    }
  }
}

// dsinks[b, h]: the preprocess blocks' parts of one (batch, head), added in a fixed order.
// grid (batch * heads), kThreads threads.
template <int kThreads = 128>
__global__ void __launch_bounds__(kThreads) bwd_sink_grad_kernel(float const* sink_partials, int parts, float* dsinks) {
  float sum = 0.f;
  float const* mine = sink_partials + int64_t(blockIdx.x) * parts;
  for (int i = threadIdx.x; i < parts; i += kThreads) { sum += mine[i]; }
  float const total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) { dsinks[blockIdx.x] = total; }
}

}  // namespace jax_fa3
