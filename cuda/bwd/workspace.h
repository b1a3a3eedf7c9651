// How the backward pass carves its workspace: one XLA-owned byte buffer (an extra result
// of the custom call), so the handler allocates nothing. Python's bwd_workspace_bytes
// (jax_fa3/primitives.py) must be at least `bytes`; the handler checks it.
#pragma once

#include <cstdint>

namespace jax_fa3 {

struct BwdWorkspace {
  float* dq_accum = nullptr;   // [batch, heads, m_blocks, block_m * head_dim], zeroed per call
  float* dpsum = nullptr;      // [batch, heads, seqlen_q_rounded]
  float* lse_log2 = nullptr;   // [batch, heads, seqlen_q_rounded]
  float* dk_accum = nullptr;   // [batch, seqlen_k, kv_heads, head_dim], GQA only, zeroed
  float* dv_accum = nullptr;   // [batch, seqlen_k, kv_heads, head_dim_v], GQA only, zeroed
  int* dq_semaphore = nullptr; // [batch, heads, m_blocks], deterministic only, zeroed
  int* dkv_semaphore = nullptr;// [batch, kv_heads, n_blocks], deterministic GQA only, zeroed
  float* sink_partials = nullptr;  // [batch, heads, sink_blocks]: the preprocess blocks' dsinks parts
  int64_t bytes = 0;           // total size needed
  int64_t zeroed_bytes = 0;    // the prefix that must be zeroed before the main kernel

  // sink_blocks: the preprocess blocks per (batch, head) when there are sinks, else 0.
  // With base == nullptr only computes the sizes. The zeroed buffers come first so one
  // memset clears them all.
  static BwdWorkspace carve(void* base, int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q,
                            int64_t seqlen_k, int64_t head_dim, int64_t head_dim_v, int64_t block_m,
                            int64_t block_n, bool deterministic, int64_t sink_blocks = 0) {
    BwdWorkspace w;
    bool const gqa = heads != kv_heads;
    int64_t const m_blocks = (seqlen_q + block_m - 1) / block_m;
    int64_t const n_blocks = (seqlen_k + block_n - 1) / block_n;
    int64_t const seqlen_q_rounded = m_blocks * block_m;
    char* p = static_cast<char*>(base);
    int64_t offset = 0;
    auto take = [&](int64_t bytes) {
      void* result = p ? p + offset : nullptr;
      offset += (bytes + 255) / 256 * 256;
      return result;
    };
    w.dq_accum = static_cast<float*>(take(4 * batch * heads * seqlen_q_rounded * head_dim));
    if (gqa) {
      w.dk_accum = static_cast<float*>(take(4 * batch * seqlen_k * kv_heads * head_dim));
      w.dv_accum = static_cast<float*>(take(4 * batch * seqlen_k * kv_heads * head_dim_v));
    }
    if (deterministic) {
      w.dq_semaphore = static_cast<int*>(take(4 * batch * heads * m_blocks));
      if (gqa) { w.dkv_semaphore = static_cast<int*>(take(4 * batch * kv_heads * n_blocks)); }
    }
    w.zeroed_bytes = offset;
    w.dpsum = static_cast<float*>(take(4 * batch * heads * seqlen_q_rounded));
    w.lse_log2 = static_cast<float*>(take(4 * batch * heads * seqlen_q_rounded));
    if (sink_blocks) { w.sink_partials = static_cast<float*>(take(4 * batch * heads * sink_blocks)); }
    w.bytes = offset;
    return w;
  }
};

}  // namespace jax_fa3
