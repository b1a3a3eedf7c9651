// The packed-sequence descriptors built on the device (CONTRACT.md, jax_fa3_segment_rows,
// jax_fa3_forward_tiles, jax_fa3_backward_plans). jax_fa3/segments.py states what they hold,
// in JAX, and is their reference: these kernels give the same int32 arrays, entry for entry,
// in a few launches instead of XLA's ~30 small kernels.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace jax_fa3 {

// Threads of the plans' launches that give a thread (or a warp) to each position (or tile).
constexpr int kPlanPositionThreads = 256;
constexpr int kPlanPositionWarps = kPlanPositionThreads / 32;

// Past every position (sequences are at most 2^30 long): segments.py's _FAR.
constexpr int kPlanFar = 1 << 30;

// log2 of the id table's slot count for a side whose other side has `other_length`
// positions: the power of two at least 2 * other_length (segments.py, _row_spans).
inline int rows_table_log2(int64_t other_length) {
  int64_t const n = other_length * 2 - 1 > 1 ? other_length * 2 - 1 : 1;
  int bits = 0;
  while ((int64_t(1) << bits) <= n) { ++bits; }
  return bits;
}

// Each (row, side)'s table: run count, first and end position per slot.
inline int64_t rows_workspace_ints(int64_t batch, int64_t seqlen_q, int64_t seqlen_k) {
  return batch * 3 * ((int64_t(1) << rows_table_log2(seqlen_k)) + (int64_t(1) << rows_table_log2(seqlen_q)));
}

struct RowsParams {
  int const* q_ids;       // [batch, seqlen_q]
  int const* kv_ids;      // [batch, seqlen_k]
  int const* q_offsets;   // [batch, seqlen_q]
  int const* kv_offsets;  // [batch, seqlen_k]
  int4* q_rows;           // [batch, seqlen_q] {id, first key, end key, interleaved}
  int4* kv_rows;          // [batch, seqlen_k] {id, first query, end query, interleaved}
  int* table;             // rows_workspace_ints
  int batch, seqlen_q, seqlen_k;
  int window_left, window_right;  // -1: unbounded; else at most seqlen_q + seqlen_k
  int q_table_log2, kv_table_log2;  // rows_table_log2(seqlen_k), rows_table_log2(seqlen_q)
};

// The forward's tiles: at most 3 * ceil(seqlen_q / block_m) + 1 per row (segments.py).
inline int64_t forward_tile_capacity(int64_t seqlen_q, int block_m) {
  return 3 * ((seqlen_q + block_m - 1) / block_m) + 1;
}

// Per row: its tiles' query bounds (capacity x 2), its run starts and stretch starts
// (seqlen_q + 1 each), its tile count, and per block of kPlanPositionThreads queries the
// block's run starts (a slot per query) and their count; 16-byte aligned.
inline int64_t tiles_workspace_row_ints(int64_t seqlen_q, int block_m) {
  int64_t const blocks = (seqlen_q + kPlanPositionThreads - 1) / kPlanPositionThreads;
  int64_t const ints = 2 * forward_tile_capacity(seqlen_q, block_m) + 2 * (seqlen_q + 1) + 1 +
                       blocks * (kPlanPositionThreads + 1);
  return (ints + 3) / 4 * 4;
}

inline int64_t tiles_workspace_ints(int64_t batch, int64_t seqlen_q, int block_m) {
  return batch * tiles_workspace_row_ints(seqlen_q, block_m);
}

struct TilesParams {
  int4 const* q_rows;  // [batch, seqlen_q]
  int* plan;           // [1 + batch * capacity, 8]
  int* workspace;      // tiles_workspace_ints
  int batch, seqlen_q, block_m, block_n, capacity;
  int64_t row_ints;  // tiles_workspace_row_ints
};

// Per row and query tile: the tile's reach and start (segments.py, backward_plans).
inline int64_t backward_plans_workspace_ints(int64_t batch, int64_t seqlen_q, int block_m) {
  return batch * 2 * ((seqlen_q + block_m - 1) / block_m);
}

struct BackwardPlansParams {
  int4 const* q_rows;  // [batch, seqlen_q]
  int4* query_tiles;   // [batch, tiles] {n_min, n_max, right_masked, left_masked}
  int2* key_blocks;    // [batch, key_blocks] {m_begin, m_end}
  int* workspace;      // backward_plans_workspace_ints
  int batch, seqlen_q, block_m, block_n, tiles, num_key_blocks;
};

cudaError_t run_segment_rows(RowsParams const& p, cudaStream_t stream);
cudaError_t run_forward_tiles(TilesParams const& p, cudaStream_t stream);
cudaError_t run_backward_plans(BackwardPlansParams const& p, cudaStream_t stream);

}  // namespace jax_fa3
