// jax_fa3_backward_plans: the packed backward's plans (segments.py, backward_plans). Two
// launches: a warp per query tile finds its key blocks; then one CTA per row takes a running
// max of the tiles' last block and a running min (from the end) of their first, and gives each
// key block the bounds of the query tiles whose blocks can hold it.
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/block_scan.h"
#include "plans/key_blocks.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

// Grid: ceil(tiles / kPlanPositionWarps) CTAs per row, rows after one another.
__global__ void __launch_bounds__(kPlanPositionThreads) query_tiles_kernel(BackwardPlansParams const p,
                                                                         int ctas_per_row) {
  int const row = int(blockIdx.x / unsigned(ctas_per_row));
  int const t = int(blockIdx.x % unsigned(ctas_per_row)) * kPlanPositionWarps + int(threadIdx.x / 32);
  if (t >= p.tiles) { return; }
  int const begin = t * p.block_m;
  plans::TileKeyBlocks const b =
      plans::tile_key_blocks(plans::warp_tile_spans(p.q_rows + int64_t(row) * p.seqlen_q, begin,
                                                    min(begin + p.block_m, p.seqlen_q)),
                             p.block_n, /*from_first_key=*/false);
  if (threadIdx.x % 32 == 0) { p.query_tiles[int64_t(row) * p.tiles + t] = make_int4(b.n_min, b.n_max, b.right, b.left); }
}

// out[2 n] = the number of entries of the non-decreasing values[0, tiles) that are at most n,
// for n in [0, blocks): n in [values[t - 1], values[t]) gets t.
__device__ void count_at_most(int const* values, int tiles, int blocks, int* out) {
  plans::Chunk const c(tiles + 1);
  for (int t = c.begin; t < c.end; ++t) {
    int const lo = t == 0 ? 0 : min(max(values[t - 1], 0), blocks);
    int const hi = t == tiles ? blocks : min(max(values[t], 0), blocks);
    for (int n = lo; n < hi; ++n) { out[2 * n] = t; }
  }
}

__global__ void __launch_bounds__(plans::kPlanThreads) key_blocks_kernel(BackwardPlansParams const p) {
  __shared__ plans::ScanStorage storage;
  int const row = blockIdx.x;
  int4 const* const tiles = p.query_tiles + int64_t(row) * p.tiles;
  int* const reach = p.workspace + int64_t(row) * 2 * p.tiles;
  int* const start = reach + p.tiles;

  auto empty = [&](int4 tile) { return tile.y <= tile.x; };
  plans::scan_row(
      p.tiles, false, plans::Max{}, 0, [&](int t) { return empty(tiles[t]) ? 0 : tiles[t].y; },
      [&](int t, int v) { reach[t] = v; }, storage);
  plans::scan_row(
      p.tiles, true, plans::Min{}, kPlanFar, [&](int t) { return empty(tiles[t]) ? kPlanFar : tiles[t].x; },
      [&](int t, int v) { start[t] = v; }, storage);
  __syncthreads();
  int* const key_blocks = reinterpret_cast<int*>(p.key_blocks + int64_t(row) * p.num_key_blocks);
  count_at_most(reach, p.tiles, p.num_key_blocks, key_blocks);
  count_at_most(start, p.tiles, p.num_key_blocks, key_blocks + 1);
}

}  // namespace

cudaError_t run_backward_plans(BackwardPlansParams const& p, cudaStream_t stream) {
  if (p.batch == 0 || (p.tiles == 0 && p.num_key_blocks == 0)) { return cudaSuccess; }
  int const ctas_per_row = (p.tiles + kPlanPositionWarps - 1) / kPlanPositionWarps;
  if (ctas_per_row > 0) {
    query_tiles_kernel<<<unsigned(int64_t(ctas_per_row) * p.batch), kPlanPositionThreads, 0, stream>>>(p,
                                                                                                        ctas_per_row);
  }
  key_blocks_kernel<<<unsigned(p.batch), plans::kPlanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_fa3
