// The split-KV combine: out = sum_s exp(lse_s - lse) O_s with lse = log sum_s exp(lse_s), per
// query row, over the float32 partials of decode_kernel. One CTA per (batch, KV head) x m-block,
// like the split kernel, so it reads each partial once. A NaN partial (a bad sequence) makes
// the row NaN; a row no split saw gets 0 and lse -inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode/kernel.h"
#include "decode/params.h"
#include "decode/warp_ops.h"

namespace jax_fa3::decode {

constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / 32;
// Partials read per thread before any is used: the loads of one row's splits overlap
// instead of paying one L2 round trip per split.
constexpr int kCombineBatch = 8;

template <class Element>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(DecodeParams const p) {
  __shared__ float weight[kDecodeMaxSplits][kDecodeRows];  // exp(lse_s - lse) per split and row
  __shared__ float row_lse[kDecodeRows];
  DecodeTile const tile = decode_tile(p);
  int const batch = tile.batch, kv_head = tile.kv_head, m_block = tile.m_block;
  int const group = p.heads / p.kv_heads;
  int const valid_rows = min(kDecodeRows, group * p.seqlen_q - m_block * kDecodeRows);
  int const splits = p.num_splits;
  int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Consecutive splits of this CTA's rows are kDecodeRows rows apart in the partials.
  RowOffsets const first = partial_row(p, batch, kv_head, m_block, 0, 0);

  // The weights: a warp per row, its lanes over the splits.
  for (int row = warp; row < valid_rows; row += kCombineWarps) {
    float m = -INFINITY;
    bool nan = false;
    for (int s = lane; s < splits; s += 32) {
      float const x = p.partial_lse[first.lse + s * kDecodeRows + row];
      weight[s][row] = x;
      nan |= isnan(x);
      m = fmaxf(m, x);
    }
    m = warp_max(m);
    nan = __any_sync(0xffffffffu, nan);
    float sum = 0.f;
    for (int s = lane; s < splits; s += 32) { sum += m == -INFINITY ? 0.f : expf(weight[s][row] - m); }
    sum = warp_sum(sum);
    float const lse = nan ? __int_as_float(0x7fffffff) : sum > 0.f ? m + logf(sum) : -INFINITY;
    for (int s = lane; s < splits; s += 32) {
      float const x = weight[s][row];
      weight[s][row] = nan ? lse : x == -INFINITY ? 0.f : expf(x - lse);
    }
    if (lane == 0) { row_lse[row] = lse; }
  }
  __syncthreads();

  int const columns = p.head_dim / 4;
  for (int i = threadIdx.x; i < valid_rows * columns; i += kCombineThreads) {
    int const row = i / columns;
    int const col = (i % columns) * 4;
    float const* const partial = p.partial_out + first.out + int64_t(row) * p.head_dim + col;
    int64_t const split_stride = int64_t(kDecodeRows) * p.head_dim;
    float4 value{0.f, 0.f, 0.f, 0.f};
    for (int s0 = 0; s0 < splits; s0 += kCombineBatch) {
      float4 x[kCombineBatch];
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {  // past the last split: its partial again, weight 0
        int const s = min(s0 + j, splits - 1);
        x[j] = __ldg(reinterpret_cast<float4 const*>(partial + s * split_stride));
      }
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {
        float const w = s0 + j < splits ? weight[s0 + j][row] : 0.f;
        value.x += w * x[j].x, value.y += w * x[j].y, value.z += w * x[j].z, value.w += w * x[j].w;
      }
    }
    RowOffsets const dst = output_row(p, batch, kv_head, m_block, row);
    uint2 const packed{pack2<Element>(value.x, value.y), pack2<Element>(value.z, value.w)};
    *reinterpret_cast<uint2*>(static_cast<Element*>(p.out) + dst.out + col) = packed;
    if (col == 0) { p.lse[dst.lse] = row_lse[row]; }
  }
}

}  // namespace jax_fa3::decode
