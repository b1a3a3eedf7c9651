// jax_fa3_segment_rows: each query's and key's span on the other side (segments.py, rows and
// _row_spans). Per (row, side), the other side's runs of one id are hashed by id into a table
// of (run count, first, end) in the workspace, then each position looks its id up: a memset
// and two launches, each a thread per position.
#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/params.h"

namespace jax_fa3 {
namespace {


// segments.py's _slot: Fibonacci hashing into 2^log2 slots.
__device__ __forceinline__ int slot_of(int id, int log2) { return int((unsigned(id) * 0x9E3779B1u) >> (32 - log2)); }

// One (row, side): the positions whose spans it makes, the other side's, and its table. The
// table starts zeroed (a memset): the run count, kPlanFar - first (so that zero is "none" and
// atomicMax finds the first), and the end.
struct Side {
  int const* ids;      // [n]
  int const* offsets;  // [n]
  int const* other;    // [m]
  int4* rows;          // [n]
  int* runs;
  int* far_minus_first;
  int* end;
  int n, m, log2;

  __device__ Side(RowsParams const& p, int row, bool q_side) {
    n = q_side ? p.seqlen_q : p.seqlen_k;
    m = q_side ? p.seqlen_k : p.seqlen_q;
    ids = (q_side ? p.q_ids : p.kv_ids) + int64_t(row) * n;
    offsets = (q_side ? p.q_offsets : p.kv_offsets) + int64_t(row) * n;
    other = (q_side ? p.kv_ids : p.q_ids) + int64_t(row) * m;
    rows = (q_side ? p.q_rows : p.kv_rows) + int64_t(row) * n;
    log2 = q_side ? p.q_table_log2 : p.kv_table_log2;
    int64_t const q_slots = int64_t(1) << p.q_table_log2, kv_slots = int64_t(1) << p.kv_table_log2;
    runs = p.table + int64_t(row) * 3 * (q_slots + kv_slots) + (q_side ? 0 : 3 * q_slots);
    far_minus_first = runs + (int64_t(1) << log2);
    end = far_minus_first + (int64_t(1) << log2);
  }
};

// Grid (chunks of kPlanPositionThreads positions x rows, 2 sides).
__device__ int position(int chunks) { return int(blockIdx.x % unsigned(chunks)) * kPlanPositionThreads + int(threadIdx.x); }
__device__ int row_of(int chunks) { return int(blockIdx.x / unsigned(chunks)); }

// Only a run's first and last positions write: no two writes wait on one slot unless two
// runs share it.
__global__ void __launch_bounds__(kPlanPositionThreads) build_tables_kernel(RowsParams const p, int chunks) {
  Side const s(p, row_of(chunks), blockIdx.y == 0);
  int const j = position(chunks);
  if (j >= s.m) { return; }
  int const id = s.other[j];
  if (id < 0) { return; }
  int const slot = slot_of(id, s.log2);
  if (j == 0 || s.other[j - 1] != id) {
    atomicAdd(&s.runs[slot], 1);
    atomicMax(&s.far_minus_first[slot], kPlanFar - j);
  }
  if (j == s.m - 1 || s.other[j + 1] != id) { atomicMax(&s.end[slot], j + 1); }
}

__global__ void __launch_bounds__(kPlanPositionThreads) look_up_kernel(RowsParams const p, int chunks) {
  bool const q_side = blockIdx.y == 0;
  Side const s(p, row_of(chunks), q_side);
  int const i = position(chunks);
  if (i >= s.n) { return; }
  int const id = s.ids[i];
  int const slot = slot_of(id, s.log2);
  int const count = s.runs[slot];
  int lo = kPlanFar - s.far_minus_first[slot], hi = s.end[slot];
  bool const exact = count == 1 && s.m > 0 && s.other[min(max(lo, 0), s.m - 1)] == id;
  // The window, seen from a query (its diagonal i + offset) or from a key.
  if (q_side) {
    int const diagonal = i + s.offsets[i];
    if (p.window_left >= 0) { lo = max(lo, diagonal - p.window_left); }
    if (p.window_right >= 0) { hi = min(hi, diagonal + p.window_right + 1); }
  } else {
    int const key = i - s.offsets[i];
    if (p.window_right >= 0) { lo = max(lo, key - p.window_right); }
    if (p.window_left >= 0) { hi = min(hi, key + p.window_left + 1); }
  }
  bool const sees = id >= 0 && (count > 1 || exact) && lo < hi;
  s.rows[i] = make_int4(id, sees ? lo : 0, sees ? hi : 0, sees && !exact ? 1 : 0);
}

}  // namespace

cudaError_t run_segment_rows(RowsParams const& p, cudaStream_t stream) {
  if (p.batch == 0 || (p.seqlen_q == 0 && p.seqlen_k == 0)) { return cudaSuccess; }
  int64_t const ints = rows_workspace_ints(p.batch, p.seqlen_q, p.seqlen_k);
  if (cudaError_t e = cudaMemsetAsync(p.table, 0, 4 * ints, stream); e != cudaSuccess) { return e; }
  int const chunks = (std::max(p.seqlen_q, p.seqlen_k) + kPlanPositionThreads - 1) / kPlanPositionThreads;
  dim3 const grid(unsigned(int64_t(chunks) * p.batch), 2);
  build_tables_kernel<<<grid, kPlanPositionThreads, 0, stream>>>(p, chunks);
  look_up_kernel<<<grid, kPlanPositionThreads, 0, stream>>>(p, chunks);
  return cudaGetLastError();
}

}  // namespace jax_fa3
