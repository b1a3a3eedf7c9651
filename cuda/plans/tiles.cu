// jax_fa3_forward_tiles: the packed forward's query tiles, cut at the documents (segments.py,
// forward_tiles). One CTA per row finds its runs of one id, the stretches (a run at least
// block_m long, or the queries between two such runs), a tile every block_m queries of each
// stretch, and each tile's key blocks (one warp per tile); a second launch moves the rows'
// tiles next to each other behind the total count.
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/block_scan.h"
#include "plans/key_blocks.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

using plans::kPlanThreads;
using plans::kPlanWarps;

struct RowWorkspace {
  int* runs;       // run starts, then seqlen_q; later each stretch's first tile
  int* stretches;  // stretch starts, then seqlen_q
  int* tiles;      // [capacity, 8] plan rows
  int* count;
};

__device__ RowWorkspace row_workspace(TilesParams const& p, int row) {
  int* const base = p.workspace + int64_t(row) * (2 * (p.seqlen_q + 1) + 8 * p.capacity + 1);
  int* const stretches = base + p.seqlen_q + 1;
  int* const tiles = stretches + p.seqlen_q + 1;
  return {base, stretches, tiles, tiles + 8 * p.capacity};
}

__global__ void __launch_bounds__(kPlanThreads) row_tiles_kernel(TilesParams const p) {
  __shared__ int warp_totals[32];
  int const row = blockIdx.x;
  int const n = p.seqlen_q;
  int4 const* const rows = p.q_rows + int64_t(row) * n;
  RowWorkspace const w = row_workspace(p, row);

  int const runs = plans::compact_row(
      n, [&](int i) { return i == 0 || rows[i].x != rows[i - 1].x; }, [&](int r, int i) { w.runs[r] = i; },
      warp_totals);
  if (threadIdx.x == 0) { w.runs[runs] = n; }
  __syncthreads();
  // Run 0 always starts one: the queries before the first long run form a stretch.
  auto long_run = [&](int r) { return w.runs[r + 1] - w.runs[r] >= p.block_m; };
  int const stretches = plans::compact_row(
      runs, [&](int r) { return r == 0 || long_run(r) || long_run(r - 1); },
      [&](int k, int r) { w.stretches[k] = w.runs[r]; }, warp_totals);
  if (threadIdx.x == 0) { w.stretches[stretches] = n; }
  __syncthreads();

  // Each stretch's first tile (in w.runs, free now), and the row's tile count.
  int* const first_tile = w.runs;
  auto tiles_of = [&](int k) { return (w.stretches[k + 1] - w.stretches[k] + p.block_m - 1) / p.block_m; };
  __shared__ int tile_count;
  if (threadIdx.x == 0) { tile_count = 0; }
  __syncthreads();
  plans::scan_row(
      stretches, false, plans::Sum{}, 0, tiles_of,
      [&](int k, int through_k) {
        first_tile[k] = through_k - tiles_of(k);
        if (k == stretches - 1) { tile_count = through_k; }
      },
      warp_totals);
  __syncthreads();

  int const lane = threadIdx.x % 32;
  for (int t = threadIdx.x / 32; t < tile_count; t += kPlanWarps) {
    int lo = 0, hi = stretches - 1;  // the last stretch whose first tile is at most t
    while (lo < hi) {
      int const mid = (lo + hi + 1) / 2;
      if (first_tile[mid] <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    int const q_begin = w.stretches[lo] + (t - first_tile[lo]) * p.block_m;
    int const q_end = min(q_begin + p.block_m, w.stretches[lo + 1]);
    plans::TileKeyBlocks const b =
        plans::tile_key_blocks(plans::warp_tile_spans(rows, q_begin, q_end), p.block_n, /*from_first_key=*/true);
    if (lane == 0) {
      int4* const out = reinterpret_cast<int4*>(w.tiles + 8 * t);
      out[0] = make_int4(row, q_begin, q_end, b.offset);
      out[1] = make_int4(b.n_max, b.right, b.left, 0);
    }
  }
  if (threadIdx.x == 0) { *w.count = tile_count; }
}

// Row b's tiles go to plan rows 1 + (tiles of rows before b) on; row 0 holds the total and
// the rows past it are zero.
__global__ void __launch_bounds__(kPlanThreads) gather_tiles_kernel(TilesParams const p) {
  __shared__ int warp_totals[32];
  int const row = blockIdx.x;
  int before = 0, all = 0;
  for (int r = threadIdx.x; r < p.batch; r += blockDim.x) {
    int const c = *row_workspace(p, r).count;
    all += c;
    before += r < row ? c : 0;
  }
  before = plans::cta_sum(before, warp_totals);
  int const total = plans::cta_sum(all, warp_totals);
  RowWorkspace const w = row_workspace(p, row);
  int const count = *w.count;
  int4* const plan = reinterpret_cast<int4*>(p.plan);  // two int4 per plan row
  int4 const* const tiles = reinterpret_cast<int4 const*>(w.tiles);
  for (int i = threadIdx.x; i < 2 * count; i += blockDim.x) { plan[2 * (1 + before) + i] = tiles[i]; }
  // This row's share of the zeros: plan rows [1 + row * capacity, 1 + (row + 1) * capacity)
  // past the total.
  int64_t const zero_begin = max(int64_t(1) + total, int64_t(1) + int64_t(row) * p.capacity);
  int64_t const zero_end = int64_t(1) + int64_t(row + 1) * p.capacity;
  for (int64_t r = zero_begin + threadIdx.x / 2; r < zero_end; r += blockDim.x / 2) {
    plan[2 * r + threadIdx.x % 2] = make_int4(0, 0, 0, 0);
  }
  if (row == 0 && threadIdx.x < 2) { plan[threadIdx.x] = make_int4(threadIdx.x == 0 ? total : 0, 0, 0, 0); }
}

}  // namespace

cudaError_t run_forward_tiles(TilesParams const& p, cudaStream_t stream) {
  if (p.batch == 0) { return cudaSuccess; }
  row_tiles_kernel<<<unsigned(p.batch), kPlanThreads, 0, stream>>>(p);
  gather_tiles_kernel<<<unsigned(p.batch), kPlanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_fa3
