// The backward pass's parameters, filled by the FFI handler from XLA's buffers.
#pragma once

#include <cstdint>

namespace jax_fa3 {

struct BwdParams {
  void const* dout;
  void const* q;
  void const* k;
  void const* v;
  void const* out;
  float const* lse;           // [batch, heads, seqlen_q], natural log
  int const* seqused_q;       // [batch] or nullptr
  int const* seqused_k;       // [batch] or nullptr
  // Packed sequences (common/segments.h), all present or all nullptr: the rows
  // [batch, seqlen_q, 4] and [batch, seqlen_k, 4]; per query tile the forward's key range in
  // the backward's tiles [batch, m_blocks, 4]; per key block {m_begin, m_end} [batch, n_blocks, 2].
  int const* q_rows;
  int const* kv_rows;
  int const* query_tile_plan;
  int const* key_block_plan;
  float const* sinks;         // [batch, heads] attention-sink logits, or nullptr
  void* dq;
  void* dk;
  void* dv;
  float* dsinks;              // [batch, heads] (with sinks)
  void* workspace;            // carved by the launcher (see bwd/workspace.h)
  int64_t workspace_bytes;

  int batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v;

  // Element strides of the BTNH tensors (the head-dim stride is 1); the gradients
  // share the layout of their inputs, and dout/out the layout of out.
  int64_t q_row_stride, q_head_stride, q_batch_stride;
  int64_t k_row_stride, k_head_stride, k_batch_stride;
  int64_t v_row_stride, v_head_stride, v_batch_stride;
  int64_t o_row_stride, o_head_stride, o_batch_stride;

  float softmax_scale;
  float softcap;
  int window_left, window_right, diagonal_offset;
  bool deterministic;

  int num_sms;
};

}  // namespace jax_fa3
