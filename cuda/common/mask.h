// Which keys each query row sees: the key-length bound and the (causal) window around
// the row's diagonal. Applied only to tiles that straddle a boundary.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

#include "common/block_ranges.h"
#include "common/layouts.h"

namespace jax_fa3 {

using namespace cute;

// Sets to -inf every score whose column lies outside its row's visible interval
// [lo[r], hi[r]) (columns relative to the thread's first column). Columns are thread 0's
// compile-time columns, so no per-column index lives in registers (a runtime identity
// tensor of 176 columns would cost 88 of them).
template <int kRows, class Engine, class Layout, class Thread0Coords>
__device__ __forceinline__ void mask_outside(Tensor<Engine, Layout>& acc, Thread0Coords const& thread0_coords,
                                             int const (&lo)[kRows], int const (&hi)[kRows]) {
  Tensor s = make_tensor(acc.data(), acc_rows_cols(acc.layout()));
  Tensor c = make_tensor(thread0_coords.data(), acc_rows_cols(thread0_coords.layout()));
  static_assert(decltype(size<0>(s))::value == kRows);
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      int const col = get<1>(c(0, j));  // a compile-time constant
      if (col >= hi[r] || col < lo[r]) { s(r, j) = -INFINITY; }
    }
  }
}

// An interval bound relative to a tile column, clamped to [-1, tile width] so it fits int.
template <int kTileColumns>
__device__ __forceinline__ int clamp_to_tile(int64_t bound, int64_t first_column) {
  return int(std::max<int64_t>(std::min<int64_t>(bound - first_column, kTileColumns), -1));
}

// The visibility rule on a (query rows, key columns) score tile of the forward pass:
// row i sees keys [i + offset - window_left, i + offset + window_right] within seqlen_k.
struct AttentionMask {
  int seqlen_k, window_left, window_right, diagonal_offset;

  template <int kBlockM, int kBlockN, int kRows, class Engine, class Layout, class Thread0Coords>
  __device__ __forceinline__ void apply(Tensor<Engine, Layout>& acc_s, Thread0Coords const& thread0_coords,
                                        int const (&rows)[kRows], int column_offset, int m_block,
                                        int n_block) const {
    int64_t const col0 = int64_t(n_block) * kBlockN + column_offset;
    int lo[kRows], hi[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int64_t const diagonal = int64_t(m_block) * kBlockM + rows[r] + diagonal_offset;
      int64_t last = seqlen_k;
      if (window_right >= 0) { last = std::min<int64_t>(last, diagonal + window_right + 1); }
      hi[r] = clamp_to_tile<kBlockN>(last, col0);
      lo[r] = clamp_to_tile<kBlockN>(window_left >= 0 ? diagonal - window_left : 0, col0);
    }
    mask_outside(acc_s, thread0_coords, lo, hi);
  }

  // The same rule on a transposed (key rows, query columns) tile of the backward pass:
  // key j is seen by queries [j - offset - window_right, j - offset + window_left].
  template <int kBlockN, int kBlockM, int kRows, class Engine, class Layout, class Thread0Coords>
  __device__ __forceinline__ void apply_transposed(Tensor<Engine, Layout>& acc_st, Thread0Coords const& thread0_coords,
                                                   int const (&rows)[kRows], int column_offset, int n_block,
                                                   int m_block) const {
    int64_t const col0 = int64_t(m_block) * kBlockM + column_offset;
    int lo[kRows], hi[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int64_t const key = int64_t(n_block) * kBlockN + rows[r];
      int64_t const diagonal = key - diagonal_offset;
      bool const valid = key < seqlen_k;
      int64_t const first = window_right >= 0 ? diagonal - window_right : 0;
      int64_t const last = window_left >= 0 ? diagonal + window_left + 1 : col0 + kBlockM;
      lo[r] = clamp_to_tile<kBlockM>(first, col0);
      hi[r] = valid ? clamp_to_tile<kBlockM>(last, col0) : -1;
    }
    mask_outside(acc_st, thread0_coords, lo, hi);
  }
};

}  // namespace jax_fa3
