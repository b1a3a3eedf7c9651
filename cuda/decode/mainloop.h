// One warp's share of a decode CTA: for each main-loop step, kWarpKeys keys of K and V
// through the warp's own cp.async ring, then S = Q Kᵀ, the online softmax and O += P V on
// mma.sync. Warps never wait for each other inside the loop; their (max, sum, O) are merged
// once at the end (kernel.h).
#pragma once

#include <cmath>

#include "decode/config.h"
#include "decode/sequence.h"
#include "decode/warp_ops.h"

namespace jax_fa3::decode {

template <class Cfg>
struct WarpAttention {
  using Element = typename Cfg::Element;
  static constexpr int kHeadDim = Cfg::kHeadDim;
  static constexpr int kNTiles = kHeadDim / 8;  // n8 tiles of the output

  // Rows g = lane / 4 and g + 8 of the CTA's 16; columns as in mma_16x8x16's d fragment.
  float o[kNTiles][4];
  float row_max[2];  // log2 units; -inf before any visible key
  float row_sum[2];  // this lane's part; the 4 lanes of a row are summed at the end

  __device__ WarpAttention() {
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) { o[n][c] = 0.f; }
    }
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // Starts the copy of kWarpKeys keys' K and V rows into one stage. Lane l < kWarpKeys holds
  // the row code (sequence.h) of key l in `code`; columns past head_dim are zero-filled.
  __device__ static void load_stage(Element* stage, int code, DecodeParams const& p, int kv_head, int lane) {
    Element* const sk = stage;
    Element* const sv = stage + Cfg::kTileElems;
    int64_t const row_stride = int64_t(p.kv_heads) * p.head_dim;
    int64_t const head_offset = int64_t(kv_head) * p.head_dim;
    // A lane copies the same 16-byte chunk of every row it touches: rows lane / kChunks + R i.
    constexpr int kRowsPerCopy = 32 / Cfg::kChunks;
    constexpr int kCopies = Cfg::kWarpKeys / kRowsPerCopy;
    int const chunk = lane % Cfg::kChunks;
    int const lane_row = lane / Cfg::kChunks;
    int const bytes = chunk * 8 < p.head_dim ? 16 : 0;
    // Row r of the swizzled tile at copy i: (R i + lane_row) & 7 == ((R i) & 7) ^ lane_row,
    // because lane_row < R and R is a power of two, so the lane's part of the chunk's XOR is fixed.
    auto dst = [&](int i) {
      int const row = kRowsPerCopy * i + lane_row;
      return row * kHeadDim + (((chunk ^ lane_row) ^ ((kRowsPerCopy * i) & 7)) << 3);
    };
    // The common case: the keys are consecutive cache rows (a contiguous cache, or one page),
    // so each copy's source is the previous one's plus a constant stride.
    int const first = __shfl_sync(0xffffffffu, code, 0);
    if (__all_sync(0xffffffffu, first >= 0 && (lane >= Cfg::kWarpKeys || code - first == lane))) {
      int64_t const offset = (int64_t(first) + lane_row) * row_stride + head_offset + chunk * 8;
      Element const* const k_src = static_cast<Element const*>(p.k_cache) + offset;
      Element const* const v_src = static_cast<Element const*>(p.v_cache) + offset;
      int64_t const copy_stride = kRowsPerCopy * row_stride;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        cp_async_16(smem_addr(sk + dst(i)), k_src + i * copy_stride, bytes);
        cp_async_16(smem_addr(sv + dst(i)), v_src + i * copy_stride, bytes);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      int const row_code = __shfl_sync(0xffffffffu, code, kRowsPerCopy * i + lane_row);
      bool const from_new = row_code <= -2;
      int64_t const source_row = from_new ? -2 - row_code : row_code;
      bool const present = row_code != kNoRow;
      int64_t const offset = present ? source_row * row_stride + head_offset + chunk * 8 : 0;
      auto const* k_base = static_cast<Element const*>(from_new ? p.k_new : p.k_cache);
      auto const* v_base = static_cast<Element const*>(from_new ? p.v_new : p.v_cache);
      cp_async_16(smem_addr(sk + dst(i)), k_base + offset, present ? bytes : 0);
      cp_async_16(smem_addr(sv + dst(i)), v_base + offset, present ? bytes : 0);
    }
  }

  // Attends one stage: keys key0 .. key0 + kWarpKeys - 1; row r of this lane sees keys
  // [begin[r], end[r]). scale_log2 turns a score into log2 units; with softcap > 0 the score
  // is first capped.
  __device__ void step(Element const* sq, Element const* stage, int key0, int const (&begin)[2],
                       int const (&end)[2], float scale_log2, float softcap_prescale, bool softcap, int lane) {
    constexpr int kGroups = Cfg::kWarpKeys / 16;  // k16 slices of keys
    Element const* const sk = stage;
    Element const* const sv = stage + Cfg::kTileElems;

    // S = Q Kᵀ: 16 rows x kWarpKeys keys, as n8 tiles (two per group of 16 keys).
    float s[2 * kGroups][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(sq + swizzled<kHeadDim>(lane & 15, kk * 2 + (lane >> 4))));
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        uint32_t b[4];
        ldmatrix_x4(b, smem_addr(sk + swizzled<kHeadDim>(16 * g + (lane & 7) + (lane >> 4) * 8,
                                                         kk * 2 + ((lane >> 3) & 1))));
        mma_16x8x16<Element>(s[2 * g], a, b[0], b[1]);
        mma_16x8x16<Element>(s[2 * g + 1], a, b[2], b[3]);
      }
    }

    // Online softmax in log2 units, masked keys at -inf.
    int const key_lane = key0 + 2 * (lane & 3);
    float scale_o[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2 * kGroups; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float x = s[n][2 * r + c];
          x = softcap ? fast_tanh(x * softcap_prescale) * scale_log2 : x * scale_log2;
          int const key = key_lane + n * 8 + c;
          x = key >= begin[r] && key < end[r] ? x : -INFINITY;
          s[n][2 * r + c] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      float const new_max = fmaxf(row_max[r], tile_max);
      float const reference = new_max == -INFINITY ? 0.f : new_max;  // no visible key yet: p = 0
      scale_o[r] = fast_exp2(row_max[r] - reference);
      row_max[r] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2 * kGroups; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[n][2 * r + c] = fast_exp2(s[n][2 * r + c] - reference);
          sum += s[n][2 * r + c];
        }
      }
      row_sum[r] = row_sum[r] * scale_o[r] + sum;
    }

    // O = O * scale + P V, two n8 tiles of head dims per transposed ldmatrix.
    // Once the rows' maxima settle, most steps keep them: then every factor is exactly 1 and
    // the warp skips the rescale (a uniform branch; 4 multiplies per n8 tile otherwise).
    if (__any_sync(0xffffffffu, scale_o[0] != 1.f || scale_o[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        o[n][0] *= scale_o[0];
        o[n][1] *= scale_o[0];
        o[n][2] *= scale_o[1];
        o[n][3] *= scale_o[1];
      }
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      // P of 16 keys as the A operand: its accumulator layout is already mma's A layout.
      uint32_t const pa[4] = {pack2<Element>(s[2 * g][0], s[2 * g][1]), pack2<Element>(s[2 * g][2], s[2 * g][3]),
                              pack2<Element>(s[2 * g + 1][0], s[2 * g + 1][1]),
                              pack2<Element>(s[2 * g + 1][2], s[2 * g + 1][3])};
#pragma unroll
      for (int nd = 0; nd < kHeadDim / 16; ++nd) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_addr(sv + swizzled<kHeadDim>(16 * g + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                               nd * 2 + (lane >> 4))));
        mma_16x8x16<Element>(o[2 * nd], pa, b[0], b[1]);
        mma_16x8x16<Element>(o[2 * nd + 1], pa, b[2], b[3]);
      }
    }
  }
};

}  // namespace jax_fa3::decode
