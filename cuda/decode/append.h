// The in-place append: k_new/v_new rows go to the cache at positions [cache_len, total).
// The CTAs of m-block 0 share the rows of their (batch, KV head) out by split, so a long
// append (chunked prefill) is copied by many CTAs. A row whose page is out of range is not
// written (its sequence's output is NaN); a sequence whose length is out of range writes nothing.
#pragma once

#include <cstdint>

#include "decode/sequence.h"

namespace jax_fa3::decode {

template <bool kPaged>
__device__ void append_new_rows(Sequence<kPaged> const& seq, DecodeParams const& p, int kv_head, int split,
                                int thread, int threads) {
  if (!seq.length_ok || p.seqlen_new == 0) { return; }
  int const chunks = p.head_dim / 8;  // 16-byte chunks per row
  int const rows = (p.seqlen_new - split + p.num_splits - 1) / p.num_splits;  // rows split, split + S, ...
  int64_t const row_stride = int64_t(p.kv_heads) * p.head_dim;
  for (int i = thread; i < rows * chunks; i += threads) {
    int const new_row = split + (i / chunks) * p.num_splits;
    int const chunk = i % chunks;
    int const dst_row = seq.cache_row(seq.cache_len + new_row);
    if (dst_row < 0) { continue; }
    int64_t const src = (int64_t(seq.batch) * p.seqlen_new + new_row) * row_stride + kv_head * p.head_dim + chunk * 8;
    int64_t const dst = int64_t(dst_row) * row_stride + kv_head * p.head_dim + chunk * 8;
    // 8 elements of 2 bytes: one 16-byte copy (rows are 16-byte aligned: head_dim % 8 == 0).
    auto const* k_src = reinterpret_cast<uint4 const*>(static_cast<uint16_t const*>(p.k_new) + src);
    auto const* v_src = reinterpret_cast<uint4 const*>(static_cast<uint16_t const*>(p.v_new) + src);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.k_cache) + dst) = *k_src;
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.v_cache) + dst) = *v_src;
  }
}

}  // namespace jax_fa3::decode
