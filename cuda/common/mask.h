// Which keys each query row sees: the key-length bound and the (causal) window around
// the row's diagonal. Applied only to tiles that straddle a boundary.
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

#include "common/layouts.h"

namespace jax_fa3 {

using namespace cute;

__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// A sequence's used length: seqused[batch] when given (clamped into [0, length], since
// the handler cannot check device data), else the full length.
__device__ __forceinline__ int used_length(int const* seqused, int batch, int length) {
  return seqused ? min(max(seqused[batch], 0), length) : length;
}

// The key-tile range of one query tile and where masking is needed in it. Keys are
// visited from n_block_max - 1 down to n_block_min; tiles with n >= n_block_right_masked
// cross the right edge (window or key length), tiles with n < n_block_left_masked the
// left edge of the window.
template <int kBlockM, int kBlockN>
struct KeyBlockRange {
  int n_block_min, n_block_max;
  int n_block_right_masked, n_block_left_masked;

  __device__ bool empty() const { return n_block_min >= n_block_max; }

  __device__ KeyBlockRange(int m_block, int seqlen_q, int seqlen_k, int window_left, int window_right,
                           int diagonal_offset) {
    int64_t const first_row = int64_t(m_block) * kBlockM;
    int64_t const last_row = std::min<int64_t>(first_row + kBlockM, seqlen_q) - 1;
    int64_t hi = (int64_t(seqlen_k) + kBlockN - 1) / kBlockN;
    int64_t right_masked = seqlen_k / kBlockN;
    if (window_right >= 0) {
      hi = std::min(hi, floor_div(last_row + diagonal_offset + window_right + kBlockN, kBlockN));
      right_masked = std::min(right_masked, floor_div(first_row + diagonal_offset + window_right + 1, kBlockN));
    }
    int64_t lo = 0, left_masked = 0;
    if (window_left >= 0) {
      lo = std::max<int64_t>(0, floor_div(first_row + diagonal_offset - window_left, kBlockN));
      left_masked = floor_div(last_row + diagonal_offset - window_left + kBlockN - 1, kBlockN);
    }
    if (last_row < first_row) { hi = lo; }  // no query row in this tile
    n_block_min = int(lo);
    n_block_max = int(std::max(lo, hi));
    n_block_right_masked = int(std::max<int64_t>(right_masked, 0));
    n_block_left_masked = int(std::max(left_masked, lo));
  }
};

// Sets to -inf the scores of keys a row may not see. rows[r] is the tile row of the
// thread's row r; column_offset is the thread's first column. Columns are compared as
// the compile-time columns of thread 0 plus that offset, so no per-column index is
// kept in registers (a runtime identity tensor of 176 columns would cost 88 of them).
struct AttentionMask {
  int seqlen_k, window_left, window_right, diagonal_offset;

  template <int kBlockM, int kBlockN, int kRows, class Engine, class Layout, class Thread0Coords>
  __device__ __forceinline__ void apply(Tensor<Engine, Layout>& acc_s, Thread0Coords const& thread0_coords,
                                        int const (&rows)[kRows], int column_offset, int m_block,
                                        int n_block) const {
    Tensor s = make_tensor(acc_s.data(), acc_rows_cols(acc_s.layout()));
    Tensor c = make_tensor(thread0_coords.data(), acc_rows_cols(thread0_coords.layout()));
    static_assert(decltype(size<0>(s))::value == kRows);
    int const col0 = n_block * kBlockN + column_offset;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int64_t const diagonal = int64_t(m_block) * kBlockM + rows[r] + diagonal_offset;
      // Visible columns of this row, relative to the thread's first column: [lo, hi).
      int64_t hi = seqlen_k;
      if (window_right >= 0) { hi = std::min<int64_t>(hi, diagonal + window_right + 1); }
      int64_t lo = window_left >= 0 ? diagonal - window_left : 0;
      int const hi_here = int(std::max<int64_t>(std::min<int64_t>(hi - col0, kBlockN), -1));
      int const lo_here = int(std::max<int64_t>(std::min<int64_t>(lo - col0, kBlockN), -1));
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        int const col = get<1>(c(0, j));  // a compile-time constant
        if (col >= hi_here || col < lo_here) { s(r, j) = -INFINITY; }
      }
    }
  }
};

}  // namespace jax_fa3
