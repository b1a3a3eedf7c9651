// The forward kernel's parameters, filled by the FFI handler from XLA's buffers.
#pragma once

#include <cstdint>

namespace jax_fa3 {

struct FwdParams {
  void const* q;
  void const* k;
  void const* v;
  void* out;
  float* lse;                 // [batch, heads, seqlen_q], natural log
  int const* seqused_q;       // [batch] or nullptr: rows past it are empty
  int const* seqused_k;       // [batch] or nullptr: keys past it are invisible
  // Packed sequences (common/segments.h), all present or all nullptr: the rows
  // [batch, seqlen_q, 4] and [batch, seqlen_k, 4], the plan [batch, m_blocks, 4].
  int const* q_rows;
  int const* kv_rows;
  int const* tile_plan;
  int* tile_counter;          // the dynamic scheduler's counter, zeroed on-stream per launch
  float const* sinks;         // [batch, heads] attention-sink logits, or nullptr
  uint32_t* max_logit;        // [batch, heads] common/max_logit.h keys, or nullptr (not wanted)
  // FP8 descale factors, or nullptr (1): q [batch, heads, descale_q_blocks] (blocks of
  // kFp8DescaleQRows rows), k [batch, kv_heads, descale_k_blocks] (blocks of one key tile),
  // v [batch, kv_heads]. One block means one factor per head.
  float const* descale_q;
  float const* descale_k;
  float const* descale_v;
  int descale_q_blocks, descale_k_blocks;

  int batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v;

  // Element strides of the BTNH tensors; the head-dim stride is always 1.
  int64_t q_row_stride, q_head_stride, q_batch_stride;
  int64_t k_row_stride, k_head_stride, k_batch_stride;
  int64_t v_row_stride, v_head_stride, v_batch_stride;
  int64_t o_row_stride, o_head_stride, o_batch_stride;

  float softmax_scale;        // multiplies q·k
  float softcap;              // 0 = off, else scores = softcap * tanh(scores / softcap)

  // Query row i sees key j iff j < seqlen_k(b) and, with c = i + diagonal_offset,
  // c - window_left <= j <= c + window_right (a negative window is unbounded).
  int window_left, window_right, diagonal_offset;

  int num_sms;
};

// Query rows per FP8 q descale factor: one consumer warpgroup's rows.
constexpr int kFp8DescaleQRows = 64;

// The packed forward's tile plan (jax_fa3/segments.py, forward_tiles): a batch row of
// seqlen_q queries is cut into at most 3 * ceil(seqlen_q / block_m) + 1 tiles.
inline int64_t fwd_plan_capacity(int64_t batch, int64_t seqlen_q, int block_m) {
  return batch * (3 * ((seqlen_q + block_m - 1) / block_m) + 1);
}

// A kernel's (query rows, keys) tile, for the plans made in JAX.
struct TileShape {
  int block_m, block_n;
};

}  // namespace jax_fa3
