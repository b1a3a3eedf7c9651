// The split-KV combine: out = sum_s exp(lse_s - lse) O_s with lse = log sum_s exp(lse_s), per
// query row, over the float32 partials of decode_kernel. One CTA per query row of a
// (batch, KV head) x m-block: at batch 1 the split kernel's 8-32 tiles would otherwise leave
// the combine on as few SMs, each reading every split in turn. A NaN partial (a bad
// sequence) makes the row NaN; a row no split saw gets 0 and lse -inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode/kernel.h"
#include "decode/params.h"
#include "decode/warp_ops.h"

namespace jax_fa3::decode {

constexpr int kCombineThreads = 128;
// Partials a thread loads before it needs the weights: one round trip to L2 covers a row's
// splits up to kCombineBatch * (kCombineThreads / columns) of them (32 at head dim 128).
constexpr int kCombineBatch = 8;

// Grid (tiles, rows of an m-block): blockIdx.y is the row.
template <class Element>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(DecodeParams const p) {
  __shared__ float weight[kDecodeMaxSplits];  // exp(lse_s - lse)
  __shared__ float4 group_sum[kCombineThreads];
  __shared__ float row_lse;
  DecodeTile const tile = decode_tile(p);
  int const row = blockIdx.y;
  int const group = p.heads / p.kv_heads;
  if (tile.m_block * kDecodeRows + row >= group * p.seqlen_q) { return; }
  int const splits = p.num_splits;
  // Thread t sums column t % columns over the splits s = t / columns (mod groups).
  int const columns = p.head_dim / 4;
  int const groups = kCombineThreads / columns;
  int const column = threadIdx.x % columns, first_split = threadIdx.x / columns;
  bool const summing = first_split < groups;
  RowOffsets const first = partial_row(p, tile.batch, tile.kv_head, tile.m_block, 0, row);
  int64_t const split_stride = int64_t(kDecodeRows) * p.head_dim;  // floats between two splits' rows
  float const* const partial = p.partial_out + first.out + column * 4;

  // The first batch of partials is in flight while warp 0 turns the lse into weights.
  float4 x[kCombineBatch];
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j) {
    int const s = min(first_split + j * groups, splits - 1);
    x[j] = summing ? __ldg(reinterpret_cast<float4 const*>(partial + s * split_stride)) : float4{};
  }
  if (threadIdx.x < 32) {
    int const lane = threadIdx.x;
    float m = -INFINITY;
    bool nan = false;
    for (int s = lane; s < splits; s += 32) {
      float const v = p.partial_lse[first.lse + s * kDecodeRows];
      weight[s] = v;
      nan |= isnan(v);
      m = fmaxf(m, v);
    }
    m = warp_max(m);
    nan = __any_sync(0xffffffffu, nan);
    float sum = 0.f;
    for (int s = lane; s < splits; s += 32) { sum += m == -INFINITY ? 0.f : expf(weight[s] - m); }
    sum = warp_sum(sum);
    float const lse = nan ? __int_as_float(0x7fffffff) : sum > 0.f ? m + logf(sum) : -INFINITY;
    for (int s = lane; s < splits; s += 32) {
      float const v = weight[s];
      weight[s] = nan ? lse : v == -INFINITY ? 0.f : expf(v - lse);
    }
    if (lane == 0) { row_lse = lse; }
  }
  __syncthreads();

  float4 value{0.f, 0.f, 0.f, 0.f};
  auto accumulate = [&](float4 const& v, int s) {
    float const w = s < splits ? weight[s] : 0.f;
    value.x += w * v.x, value.y += w * v.y, value.z += w * v.z, value.w += w * v.w;
  };
#pragma unroll
  for (int j = 0; j < kCombineBatch; ++j) { accumulate(x[j], first_split + j * groups); }
  // More splits than one batch covers (over 32 at head dim 128): the rest in turn.
  for (int s = first_split + kCombineBatch * groups; summing && s < splits; s += groups) {
    accumulate(__ldg(reinterpret_cast<float4 const*>(partial + s * split_stride)), s);
  }
  group_sum[threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.x < columns) {
    for (int g = 1; g < groups; ++g) {
      float4 const v = group_sum[g * columns + threadIdx.x];
      value.x += v.x, value.y += v.y, value.z += v.z, value.w += v.w;
    }
    RowOffsets const dst = output_row(p, tile.batch, tile.kv_head, tile.m_block, row);
    uint2 const packed{pack2<Element>(value.x, value.y), pack2<Element>(value.z, value.w)};
    *reinterpret_cast<uint2*>(static_cast<Element*>(p.out) + dst.out + threadIdx.x * 4) = packed;
    if (threadIdx.x == 0) { p.lse[dst.lse] = row_lse; }
  }
}

}  // namespace jax_fa3::decode
