// The query tiles a backward CTA visits: those with a row that sees a key of its block.
// Derived from the forward's KeyBlockRange so the two passes agree on every (m, n) pair,
// which the deterministic dQ order relies on.
#pragma once

#include <cstdint>

#include "common/block_ranges.h"

namespace jax_fa3 {

template <int kBlockM, int kBlockN>
struct QueryBlocks {
  int n_block, m_begin, m_end;
  int seqlen_q, seqlen_k, window_left, window_right, diagonal_offset;

  JAX_FA3_HOST_DEVICE QueryBlocks(int n_block_, int seqlen_q_, int seqlen_k_, int window_left_, int window_right_,
                         int diagonal_offset_)
      : n_block(n_block_), seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), window_left(window_left_),
        window_right(window_right_), diagonal_offset(diagonal_offset_) {
    // Query i sees key j iff j - offset - window_right <= i <= j - offset + window_left.
    int64_t const first_key = int64_t(n_block) * kBlockN;
    int64_t const last_key = std::min<int64_t>(first_key + kBlockN, seqlen_k) - 1;
    int64_t first = window_right >= 0 ? first_key - diagonal_offset - window_right : 0;
    int64_t last = window_left >= 0 ? last_key - diagonal_offset + window_left : seqlen_q - 1;
    first = std::max<int64_t>(first, 0);
    last = std::min<int64_t>(last, seqlen_q - 1);
    bool const empty = last_key < first_key || last < first;
    m_begin = empty ? 0 : int(first / kBlockM);
    m_end = empty ? 0 : int(last / kBlockM) + 1;
  }

  // The forward's key range of query tile m: whether it includes this key block, and
  // this block's place in it (the deterministic order of dQ additions).
  JAX_FA3_HOST_DEVICE KeyBlockRange<kBlockM, kBlockN> keys_of(int m_block) const {
    return KeyBlockRange<kBlockM, kBlockN>(m_block, seqlen_q, seqlen_k, window_left, window_right, diagonal_offset);
  }
  // This key block's turn among those adding into query tile m's dQ (deterministic mode):
  // in increasing key-block order, or decreasing (see BwdTraits::Params::dq_descending).
  JAX_FA3_HOST_DEVICE int dq_turn(int m_block, bool descending) const {
    auto const keys = keys_of(m_block);
    return descending ? keys.n_block_max - 1 - n_block : n_block - keys.n_block_min;
  }
  JAX_FA3_HOST_DEVICE bool visits(int m_block) const {
    auto const keys = keys_of(m_block);
    return n_block >= keys.n_block_min && n_block < keys.n_block_max;
  }

  // Whether tile (m, n) crosses a mask edge: the key length, or either window side.
  JAX_FA3_HOST_DEVICE bool needs_mask(int m_block) const {
    int64_t const first_key = int64_t(n_block) * kBlockN;
    int64_t const last_key = first_key + kBlockN - 1;
    int64_t const first_query = int64_t(m_block) * kBlockM;
    int64_t const last_query = first_query + kBlockM - 1;
    return last_key >= seqlen_k ||
           (window_right >= 0 && first_query < last_key - diagonal_offset - window_right) ||
           (window_left >= 0 && last_query > first_key - diagonal_offset + window_left);
  }
};

#if defined(__CUDACC__)  // device code only (the host-compiled range check skips it)
// The same questions for packed sequences, answered from the plans made in JAX
// (jax_fa3/segments.py): this key block's query-tile bounds, and per query tile the forward's
// KeyBlockRange in the backward's tiles, {n_min, n_max, right_masked, left_masked}. The
// plans are checked against brute force in tests/test_packed_sequences.py.
template <int kBlockM, int kBlockN>
struct PlannedQueryBlocks {
  int n_block, m_begin, m_end;
  int4 const* query_tiles;  // the batch row's plans

  __device__ __forceinline__ int4 plan(int m_block) const { return __ldg(query_tiles + m_block); }
  __device__ __forceinline__ int dq_turn(int m_block, bool descending) const {
    int4 const keys = plan(m_block);
    return descending ? keys.y - 1 - n_block : n_block - keys.x;
  }
  __device__ __forceinline__ bool visits(int m_block) const {
    int4 const keys = plan(m_block);
    return n_block >= keys.x && n_block < keys.y;
  }
  __device__ __forceinline__ bool needs_mask(int m_block) const {
    int4 const keys = plan(m_block);
    return !(n_block >= keys.w && n_block < keys.z);
  }
};
#endif

}  // namespace jax_fa3
