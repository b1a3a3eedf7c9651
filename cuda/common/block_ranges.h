// Which tiles a CTA visits: the key blocks of a query tile (forward) and where masking is
// needed in them. Pure integer arithmetic, also compiled on the host by the range tests
// (tests/cpp/block_ranges_check.cc).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/host_device.h"

namespace jax_fa3 {

JAX_FA3_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// A sequence's used length: seqused[batch] when given (clamped into [0, length], since
// the handler cannot check device data), else the full length.
JAX_FA3_HOST_DEVICE int used_length(int const* seqused, int batch, int length) {
  return seqused ? std::min(std::max(seqused[batch], 0), length) : length;
}

// The key-tile range of one query tile and where masking is needed in it. Keys are
// visited from n_block_max - 1 down to n_block_min; tiles with n >= n_block_right_masked
// cross the right edge (window or key length), tiles with n < n_block_left_masked the
// left edge of the window.
template <int kBlockM, int kBlockN>
struct KeyBlockRange {
  int n_block_min, n_block_max;
  int n_block_right_masked, n_block_left_masked;

  JAX_FA3_HOST_DEVICE bool empty() const { return n_block_min >= n_block_max; }

  // A range planned ahead of the launch (packed sequences: jax_fa3/segments.py), with the
  // fully visible blocks [left_masked, right_masked).
  JAX_FA3_HOST_DEVICE KeyBlockRange(int min, int max, int right_masked, int left_masked)
      : n_block_min(min), n_block_max(max), n_block_right_masked(right_masked), n_block_left_masked(left_masked) {}

  JAX_FA3_HOST_DEVICE KeyBlockRange(int m_block, int seqlen_q, int seqlen_k, int window_left, int window_right,
                                    int diagonal_offset) {
    // The rows' visible keys form one interval (each row's shifts the previous by one).
    int64_t const first_row = int64_t(m_block) * kBlockM;
    int64_t const last_row = std::min<int64_t>(first_row + kBlockM, seqlen_q) - 1;
    int64_t first_key = 0, last_key = int64_t(seqlen_k) - 1;
    if (window_left >= 0) { first_key = std::max<int64_t>(first_key, first_row + diagonal_offset - window_left); }
    if (window_right >= 0) { last_key = std::min<int64_t>(last_key, last_row + diagonal_offset + window_right); }
    bool const empty_range = last_row < first_row || last_key < first_key;
    n_block_min = empty_range ? 0 : int(first_key / kBlockN);
    n_block_max = empty_range ? 0 : int(last_key / kBlockN) + 1;
    // Masking: the key-length edge and the right window side, checked on the first row...
    int64_t right_masked = seqlen_k / kBlockN;
    if (window_right >= 0) {
      right_masked = std::min(right_masked, floor_div(first_row + diagonal_offset + window_right + 1, kBlockN));
    }
    n_block_right_masked = int(std::max<int64_t>(right_masked, 0));
    // ...and the left window side, checked on the last row.
    int64_t left_masked = 0;
    if (window_left >= 0) { left_masked = floor_div(last_row + diagonal_offset - window_left + kBlockN - 1, kBlockN); }
    n_block_left_masked = int(std::max<int64_t>(left_masked, n_block_min));
  }
};

}  // namespace jax_fa3
