// jax_fa3_segment_rows: each query's and key's span on the other side (segments.py, rows and
// _row_spans). One CTA per (row, side): the other side's runs of one id are hashed by id into
// a table of (run count, first, end) in the workspace, then each position looks its id up.
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/block_scan.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

// segments.py's _slot: Fibonacci hashing into 2^log2 slots.
__device__ __forceinline__ int slot_of(int id, int log2) { return int((unsigned(id) * 0x9E3779B1u) >> (32 - log2)); }

__global__ void __launch_bounds__(plans::kPlanThreads) segment_rows_kernel(RowsParams const p) {
  int const row = blockIdx.x;
  bool const q_side = blockIdx.y == 0;
  int const n = q_side ? p.seqlen_q : p.seqlen_k;      // this side's positions
  int const m = q_side ? p.seqlen_k : p.seqlen_q;      // the other side's
  int const* const ids = (q_side ? p.q_ids : p.kv_ids) + int64_t(row) * n;
  int const* const offsets = (q_side ? p.q_offsets : p.kv_offsets) + int64_t(row) * n;
  int const* const other = (q_side ? p.kv_ids : p.q_ids) + int64_t(row) * m;
  int4* const out = (q_side ? p.q_rows : p.kv_rows) + int64_t(row) * n;
  if (n == 0) { return; }
  int const q_log2 = p.q_table_log2, kv_log2 = p.kv_table_log2;
  int const log2 = q_side ? q_log2 : kv_log2;
  int const size = 1 << log2;
  int* const runs = p.table + int64_t(row) * 3 * ((1 << q_log2) + (1 << kv_log2)) + (q_side ? 0 : 3 << q_log2);
  int* const first = runs + size;
  int* const end = first + size;

  for (int i = threadIdx.x; i < size; i += blockDim.x) { runs[i] = 0, first[i] = kPlanFar, end[i] = 0; }
  __syncthreads();
  // Only a run's first and last positions write: no two writes wait on one slot unless two
  // runs share it.
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    int const id = other[j];
    if (id < 0) { continue; }
    int const slot = slot_of(id, log2);
    if (j == 0 || other[j - 1] != id) { atomicAdd(&runs[slot], 1), atomicMin(&first[slot], j); }
    if (j == m - 1 || other[j + 1] != id) { atomicMax(&end[slot], j + 1); }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int const id = ids[i];
    int const slot = slot_of(id, log2);
    int const count = runs[slot];
    int lo = first[slot], hi = end[slot];
    bool const exact = count == 1 && m > 0 && other[min(max(lo, 0), m - 1)] == id;
    // The window, seen from a query (its diagonal i + offset) or from a key.
    if (q_side) {
      int const diagonal = i + offsets[i];
      if (p.window_left >= 0) { lo = max(lo, diagonal - p.window_left); }
      if (p.window_right >= 0) { hi = min(hi, diagonal + p.window_right + 1); }
    } else {
      int const key = i - offsets[i];
      if (p.window_right >= 0) { lo = max(lo, key - p.window_right); }
      if (p.window_left >= 0) { hi = min(hi, key + p.window_left + 1); }
    }
    bool const sees = id >= 0 && (count > 1 || exact) && lo < hi;
    out[i] = make_int4(id, sees ? lo : 0, sees ? hi : 0, sees && !exact ? 1 : 0);
  }
}

}  // namespace

cudaError_t run_segment_rows(RowsParams const& p, cudaStream_t stream) {
  if (p.batch == 0 || (p.seqlen_q == 0 && p.seqlen_k == 0)) { return cudaSuccess; }
  segment_rows_kernel<<<dim3(unsigned(p.batch), 2), plans::kPlanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_fa3
