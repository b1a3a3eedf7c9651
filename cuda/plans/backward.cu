// jax_fa3_backward_plans: the packed backward's plans (segments.py, backward_plans). One CTA
// per row: each query tile's key blocks (one warp per tile), then for each key block the
// bounds of the query tiles whose blocks can hold it, from a running max of the tiles' last
// block and a running min (from the end) of their first.
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/block_scan.h"
#include "plans/key_blocks.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

using plans::kPlanThreads;
using plans::kPlanWarps;

// The number of entries of the non-decreasing values[0, n) that are at most x.
__device__ int count_at_most(int const* values, int n, int x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    int const mid = (lo + hi) / 2;
    if (values[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kPlanThreads) backward_plans_kernel(BackwardPlansParams const p) {
  __shared__ int warp_totals[32];
  int const row = blockIdx.x;
  int4 const* const rows = p.q_rows + int64_t(row) * p.seqlen_q;
  int4* const tiles = p.query_tiles + int64_t(row) * p.tiles;
  int* const reach = p.workspace + int64_t(row) * 2 * p.tiles;
  int* const start = reach + p.tiles;

  for (int t = threadIdx.x / 32; t < p.tiles; t += kPlanWarps) {
    int const begin = t * p.block_m;
    plans::TileKeyBlocks const b = plans::tile_key_blocks(
        plans::warp_tile_spans(rows, begin, min(begin + p.block_m, p.seqlen_q)), p.block_n, /*from_first_key=*/false);
    if (threadIdx.x % 32 == 0) { tiles[t] = make_int4(b.n_min, b.n_max, b.right, b.left); }
  }
  __syncthreads();

  auto empty = [&](int t) { return tiles[t].y <= tiles[t].x; };
  plans::scan_row(
      p.tiles, false, plans::Max{}, 0, [&](int t) { return empty(t) ? 0 : tiles[t].y; },
      [&](int t, int v) { reach[t] = v; }, warp_totals);
  plans::scan_row(
      p.tiles, true, plans::Min{}, kPlanFar, [&](int t) { return empty(t) ? kPlanFar : tiles[t].x; },
      [&](int t, int v) { start[t] = v; }, warp_totals);
  __syncthreads();

  int2* const key_blocks = p.key_blocks + int64_t(row) * p.num_key_blocks;
  for (int n = threadIdx.x; n < p.num_key_blocks; n += blockDim.x) {
    key_blocks[n] = make_int2(count_at_most(reach, p.tiles, n), count_at_most(start, p.tiles, n));
  }
}

}  // namespace

cudaError_t run_backward_plans(BackwardPlansParams const& p, cudaStream_t stream) {
  if (p.batch == 0 || (p.tiles == 0 && p.num_key_blocks == 0)) { return cudaSuccess; }
  backward_plans_kernel<<<unsigned(p.batch), kPlanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_fa3
