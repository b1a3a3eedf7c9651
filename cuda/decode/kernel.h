// The decode kernel: one CTA per (batch, KV head) x m-block (16 query rows) x split of the
// keys. Grid (batch * kv_heads * num_m_blocks, num_splits): see decode_tile.
//
//   1. m-block 0 copies its share of k_new/v_new into the cache (append.h);
//   2. Q -> shared memory, each warp starts its K/V ring (mainloop.h);
//   3. the warps attend interleaved 16-key slices of the split's keys;
//   4. the warps' (max, sum, O) are merged through shared memory, then written as the output
//      (one split) or as a float32 partial for the combine kernel (combine.h).
// A sequence whose length or pages are out of range gets NaN (CONTRACT.md, jax_fa3_decode).
#pragma once

#include <cmath>
#include <cstdint>

#include "decode/append.h"
#include "decode/config.h"
#include "decode/mainloop.h"
#include "decode/params.h"
#include "decode/sequence.h"
#include "decode/warp_ops.h"

namespace jax_fa3::decode {

// Q rows of the CTA into shared memory (zeros for padding rows and columns past head_dim).
template <class Cfg>
__device__ void load_q(typename Cfg::Element* sq, DecodeParams const& p, int batch, int kv_head, int m_block) {
  using Element = typename Cfg::Element;
  int const group = p.heads / p.kv_heads;
  for (int i = threadIdx.x; i < kDecodeRows * Cfg::kChunks; i += Cfg::kThreads) {
    int const row = i / Cfg::kChunks;
    int const chunk = i % Cfg::kChunks;
    int const m = m_block * kDecodeRows + row;
    bool const present = m < group * p.seqlen_q && chunk * 8 < p.head_dim;
    int64_t const offset =
        present ? ((int64_t(batch) * p.seqlen_q + m / group) * p.heads + kv_head * group + m % group) * p.head_dim +
                      chunk * 8
                : 0;
    cp_async_16(smem_addr(sq + swizzled<Cfg::kHeadDim>(row, chunk)), static_cast<Element const*>(p.q) + offset,
                present ? 16 : 0);
  }
}

// A CTA's (batch, KV head) and m-block. They share the grid's x axis, (batch, KV head)
// fastest, because a long chunk of queries has more m-blocks than a y or z dimension's
// 65535 (x takes 2^31 - 1).
struct DecodeTile {
  int batch, kv_head, m_block;
};

__device__ __forceinline__ DecodeTile decode_tile(DecodeParams const& p) {
  unsigned const sequence_heads = unsigned(p.batch * p.kv_heads);
  int const batch_head = int(blockIdx.x % sequence_heads);
  return {batch_head / p.kv_heads, batch_head % p.kv_heads, int(blockIdx.x / sequence_heads)};
}

// Element offsets of row `row` of a CTA: in out [b, token, head] and lse [b, head, token] ...
struct RowOffsets {
  int64_t out, lse;
};

__device__ __forceinline__ RowOffsets output_row(DecodeParams const& p, int batch, int kv_head, int m_block,
                                                 int row) {
  int const group = p.heads / p.kv_heads;
  int const m = m_block * kDecodeRows + row;
  int const token = m / group, head = kv_head * group + m % group;
  return {((int64_t(batch) * p.seqlen_q + token) * p.heads + head) * p.head_dim,
          (int64_t(batch) * p.heads + head) * p.seqlen_q + token};
}

// ... and in the split-KV partials (params.h's layout).
__device__ __forceinline__ RowOffsets partial_row(DecodeParams const& p, int batch, int kv_head, int m_block,
                                                  int split, int row) {
  int64_t const slot = ((int64_t(batch) * p.kv_heads + kv_head) * p.num_m_blocks + m_block) * p.num_splits + split;
  int64_t const r = slot * kDecodeRows + row;
  return {r * p.head_dim, r};
}

template <class Cfg, bool kPaged>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm) decode_kernel(DecodeParams const p) {
  using Element = typename Cfg::Element;
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(128) unsigned char smem[];
  Element* const sq = reinterpret_cast<Element*>(smem);
  Element* const skv = reinterpret_cast<Element*>(smem + Cfg::kQBytes);
  float* const stat_max = reinterpret_cast<float*>(smem + Cfg::kQBytes + Cfg::kKvBytes);  // [kWarps][rows]
  float* const stat_sum = stat_max + Cfg::kWarps * kDecodeRows;

  DecodeTile const tile = decode_tile(p);
  int const batch = tile.batch, kv_head = tile.kv_head, m_block = tile.m_block;
  int const split = blockIdx.y;
  int const warp = threadIdx.x / 32;
  int const lane = threadIdx.x % 32;
  int const group = p.heads / p.kv_heads;
  int const valid_rows = min(kDecodeRows, group * p.seqlen_q - m_block * kDecodeRows);

  Sequence<kPaged> const seq(p, batch);
  if (m_block == 0) { append_new_rows(seq, p, kv_head, split, threadIdx.x, Cfg::kThreads); }
  bool const pages_ok = __syncthreads_and(seq.pages_ok(split, p.num_splits, threadIdx.x, Cfg::kThreads));
  bool const bad = !seq.length_ok || !pages_ok;

  // The split's keys: tiles of kBlockN over the keys any of the CTA's rows sees.
  RowWindow const first_row = RowWindow::of(p, seq.total, m_block * kDecodeRows);
  RowWindow const last_row = RowWindow::of(p, seq.total, m_block * kDecodeRows + valid_rows - 1);
  int const key_begin = first_row.begin;
  int const key_end = max(key_begin, last_row.end);
  int const num_tiles = bad ? 0 : (key_end - key_begin + Cfg::kBlockN - 1) / Cfg::kBlockN;
  // Split s takes tiles [s * n / splits, (s + 1) * n / splits): every split gets floor or
  // ceil of n / splits, so none idles while another runs a tile more than it needs to.
  int const tile_begin = int(int64_t(split) * num_tiles / p.num_splits);
  int const tile_end = int(int64_t(split + 1) * num_tiles / p.num_splits);
  int const steps = tile_end - tile_begin;

  // This warp's kWarpKeys keys of tile t start at warp_key(t); lane l < kWarpKeys fetches key l's
  // row code.
  auto warp_key = [&](int t) { return key_begin + (tile_begin + t) * Cfg::kBlockN + warp * Cfg::kWarpKeys; };
  auto row_code = [&](int t) { return t < steps && lane < Cfg::kWarpKeys ? seq.row_code(warp_key(t) + lane) : kNoRow; };
  Element* const ring = skv + warp * kStages * 2 * Cfg::kTileElems;
  auto stage = [&](int t) { return ring + (t % kStages) * 2 * Cfg::kTileElems; };

  load_q<Cfg>(sq, p, batch, kv_head, m_block);
  cp_async_commit();
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < steps) { WarpAttention<Cfg>::load_stage(stage(t), row_code(t), p, kv_head, lane); }
    cp_async_commit();  // empty groups keep the group count the same for every warp and step
  }
  cp_async_wait<kStages - 1>();  // Q has landed, K/V stages are still in flight
  __syncthreads();

  int begin[2], end[2];
  for (int r = 0; r < 2; ++r) {
    RowWindow const w = RowWindow::of(p, seq.total, m_block * kDecodeRows + lane / 4 + 8 * r);
    begin[r] = w.begin;
    end[r] = w.end;
  }
  float const log2e = float(M_LOG2E);
  bool const softcap = p.softcap > 0.f;
  float const scale_log2 = (softcap ? p.softcap : p.softmax_scale) * log2e;
  float const softcap_prescale = softcap ? p.softmax_scale / p.softcap : 0.f;

  WarpAttention<Cfg> attention;
  int next_code = row_code(kStages - 1);  // issued a step ahead: the page-table read hides under the math
  for (int t = 0; t < steps; ++t) {
    int const code = next_code;
    next_code = row_code(t + kStages);
    cp_async_wait<kStages - 2>();  // step t's group is complete for this lane ...
    __syncwarp();                  // ... and, after this, for the whole warp
    attention.step(sq, stage(t), warp_key(t), begin, end, scale_log2, softcap_prescale, softcap, lane);
    __syncwarp();  // every lane has read stage t before it is refilled
    if (t + kStages - 1 < steps) { WarpAttention<Cfg>::load_stage(stage(t + kStages - 1), code, p, kv_head, lane); }
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Merge the warps: row statistics first, then the rescaled outputs, through shared memory
  // (the K/V rings are free once every warp has passed this barrier).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = attention.row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    attention.row_sum[r] = sum;
    if (lane % 4 == 0) {
      stat_max[warp * kDecodeRows + lane / 4 + 8 * r] = attention.row_max[r];
      stat_sum[warp * kDecodeRows + lane / 4 + 8 * r] = sum;
    }
  }
  __syncthreads();
  auto cta_max = [&](int row) {
    float m = -INFINITY;
    for (int w = 0; w < Cfg::kWarps; ++w) { m = fmaxf(m, stat_max[w * kDecodeRows + row]); }
    return m;
  };
  float* const exchange = reinterpret_cast<float*>(skv);  // [kWarps][rows][kHeadDim]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int const row = lane / 4 + 8 * r;
    float const m = cta_max(row);
    float const weight = m == -INFINITY ? 0.f : fast_exp2(attention.row_max[r] - m);
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      float2 const value{attention.o[n][2 * r] * weight, attention.o[n][2 * r + 1] * weight};
      *reinterpret_cast<float2*>(&exchange[(warp * kDecodeRows + row) * kHeadDim + n * 8 + 2 * (lane % 4)]) = value;
    }
  }
  __syncthreads();

  // Each thread writes 4 columns of a row: the output (normalised) and, once per row, the lse.
  float const nan = __int_as_float(0x7fffffff);
  for (int i = threadIdx.x; i < kDecodeRows * (kHeadDim / 4); i += Cfg::kThreads) {
    int const row = i / (kHeadDim / 4);
    int const col = (i % (kHeadDim / 4)) * 4;
    if (row >= valid_rows || col >= p.head_dim) { continue; }
    float const m = cta_max(row);
    float sum = 0.f;
    for (int w = 0; w < Cfg::kWarps; ++w) {
      float const sw = stat_sum[w * kDecodeRows + row];
      sum += sw == 0.f ? 0.f : sw * fast_exp2(stat_max[w * kDecodeRows + row] - m);
    }
    float4 value{0.f, 0.f, 0.f, 0.f};
    for (int w = 0; w < Cfg::kWarps; ++w) {
      float4 const x = *reinterpret_cast<float4 const*>(&exchange[(w * kDecodeRows + row) * kHeadDim + col]);
      value.x += x.x, value.y += x.y, value.z += x.z, value.w += x.w;
    }
    float const inverse = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key: 0 and lse -inf
    value = bad ? float4{nan, nan, nan, nan}
                : float4{value.x * inverse, value.y * inverse, value.z * inverse, value.w * inverse};
    float const lse = bad ? nan : sum > 0.f ? (m + __log2f(sum)) * float(M_LN2) : -INFINITY;
    if (p.num_splits > 1) {
      RowOffsets const dst = partial_row(p, batch, kv_head, m_block, split, row);
      *reinterpret_cast<float4*>(p.partial_out + dst.out + col) = value;
      if (col == 0) { p.partial_lse[dst.lse] = lse; }
    } else {
      RowOffsets const dst = output_row(p, batch, kv_head, m_block, row);
      Element* const out = static_cast<Element*>(p.out) + dst.out + col;
      uint2 packed{pack2<Element>(value.x, value.y), pack2<Element>(value.z, value.w)};
      *reinterpret_cast<uint2*>(out) = packed;
      if (col == 0) { p.lse[dst.lse] = lse; }
    }
  }
}

}  // namespace jax_fa3::decode
