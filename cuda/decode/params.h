// The decode (KV-cache) kernel's parameters, filled by the FFI handler (ffi/decode_ffi.cc).
#pragma once

#include <cstdint>

namespace jax_fa3 {

// Query rows of one decode CTA: the (query token, query head) pairs that share a KV head,
// token-major (row m = token * group + head in group), padded to one mma.sync M tile.
constexpr int kDecodeRows = 16;
// The combine kernel holds one weight per (split, row) in shared memory.
constexpr int kDecodeMaxSplits = 128;

struct DecodeParams {
  void const* q;          // [batch, seqlen_q, heads, head_dim]
  void* k_cache;          // contiguous [batch, max_seqlen, kv_heads, head_dim] or paged
  void* v_cache;          //   [num_pages, page_size, kv_heads, head_dim]; updated in place
  int const* cache_seqlens;  // [batch]: valid entries before the call
  void const* k_new;      // [batch, seqlen_new, kv_heads, head_dim] or nullptr
  void const* v_new;
  int const* page_table;  // [batch, max_pages] or nullptr (contiguous)
  void* out;              // [batch, seqlen_q, heads, head_dim]
  float* lse;             // [batch, heads, seqlen_q], natural log
  float* partial_out;     // split-KV partials (see decode_workspace_bytes), f32
  float* partial_lse;

  int batch, seqlen_q, heads, kv_heads, head_dim;
  int seqlen_new;
  // Contiguous: page_size = max_seqlen, num_pages = batch and sequence b owns "page" b.
  int page_size, num_pages, max_pages;
  int page_shift;         // log2(page_size) when it is a power of two, else -1
  int64_t capacity;       // positions a sequence can hold: max_pages * page_size

  float softmax_scale;
  float softcap;          // 0 = off
  int window_left, window_right;  // -1 = unbounded; causal is window_right = 0
  int num_splits;         // >= 1; 1 writes out/lse directly, more go through the combine
  int num_m_blocks;       // ceil(group * seqlen_q / kDecodeRows)
};

// What Python's split-count heuristic needs of a compiled variant: keys per CTA step and CTAs
// per SM (jax_fa3/kvcache.py).
struct DecodeShape {
  int block_n, ctas_per_sm;
};

// The split-KV partials: O [batch, kv_heads, m_blocks, splits, rows, head_dim] then
// lse [batch, kv_heads, m_blocks, splits, rows], float32, each rounded up to 256 bytes.
// None without splits. jax_fa3/primitives.py's decode_workspace_bytes is the same formula.
inline int64_t decode_partial_out_bytes(int batch, int kv_heads, int m_blocks, int splits, int head_dim) {
  int64_t const bytes = int64_t(batch) * kv_heads * m_blocks * splits * kDecodeRows * head_dim * 4;
  return (bytes + 255) / 256 * 256;
}

inline int64_t decode_workspace_bytes(int batch, int kv_heads, int m_blocks, int splits, int head_dim) {
  if (splits <= 1) { return 0; }
  int64_t const lse = (int64_t(batch) * kv_heads * m_blocks * splits * kDecodeRows * 4 + 255) / 256 * 256;
  return decode_partial_out_bytes(batch, kv_heads, m_blocks, splits, head_dim) + lse;
}

}  // namespace jax_fa3
