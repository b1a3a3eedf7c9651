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

template <class Element>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(DecodeParams const p) {
  __shared__ float weight[kDecodeMaxSplits][kDecodeRows];  // exp(lse_s - lse) per split and row
  __shared__ float row_lse[kDecodeRows];
  DecodeTile const tile = decode_tile(p);
  int const batch = tile.batch, kv_head = tile.kv_head, m_block = tile.m_block;
  int const group = p.heads / p.kv_heads;
  int const valid_rows = min(kDecodeRows, group * p.seqlen_q - m_block * kDecodeRows);
  int const splits = p.num_splits;
  // Consecutive splits of this CTA's rows are kDecodeRows rows apart in the partials.
  RowOffsets const first = partial_row(p, batch, kv_head, m_block, 0, 0);

  for (int i = threadIdx.x; i < splits * kDecodeRows; i += kCombineThreads) {
    weight[i / kDecodeRows][i % kDecodeRows] = p.partial_lse[first.lse + i];
  }
  __syncthreads();
  if (threadIdx.x < kDecodeRows) {
    int const row = threadIdx.x;
    float m = -INFINITY;
    bool nan = false;
    for (int s = 0; s < splits; ++s) {
      float const x = weight[s][row];
      nan |= isnan(x);
      m = fmaxf(m, x);
    }
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) { sum += m == -INFINITY ? 0.f : expf(weight[s][row] - m); }
    float const lse = nan ? __int_as_float(0x7fffffff) : sum > 0.f ? m + logf(sum) : -INFINITY;
    for (int s = 0; s < splits; ++s) {
      float const x = weight[s][row];
      weight[s][row] = nan ? lse : x == -INFINITY ? 0.f : expf(x - lse);
    }
    row_lse[row] = lse;
  }
  __syncthreads();

  int const columns = p.head_dim / 4;
  for (int i = threadIdx.x; i < valid_rows * columns; i += kCombineThreads) {
    int const row = i / columns;
    int const col = (i % columns) * 4;
    float4 value{0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < splits; ++s) {
      float const w = weight[s][row];
      float4 const x = *reinterpret_cast<float4 const*>(
          p.partial_out + first.out + (int64_t(s) * kDecodeRows + row) * p.head_dim + col);
      value.x += w * x.x, value.y += w * x.y, value.z += w * x.z, value.w += w * x.w;
    }
    RowOffsets const dst = output_row(p, batch, kv_head, m_block, row);
    uint2 const packed{pack2<Element>(value.x, value.y), pack2<Element>(value.z, value.w)};
    *reinterpret_cast<uint2*>(static_cast<Element*>(p.out) + dst.out + col) = packed;
    if (col == 0) { p.lse[dst.lse] = row_lse[row]; }
  }
}

}  // namespace jax_fa3::decode
