// jax_fa3_forward_tiles: the packed forward's query tiles, cut at the documents (segments.py,
// forward_tiles). Three launches:
//   1. a thread per query: each block of queries lists where its runs of one id start;
//   2. one CTA per row joins the lists, finds the stretches (a run at least block_m long, or
//      the queries between two such runs) and a tile every block_m queries of each stretch;
//   3. a warp per tile finds its key blocks and writes it to its place in the plan, behind
//      the tiles of the rows before it (and the unused rows at the end are zeroed).
#include <cstdint>

#include <cuda_runtime.h>

#include "plans/block_scan.h"
#include "plans/key_blocks.h"
#include "plans/params.h"

namespace jax_fa3 {
namespace {

struct RowWorkspace {
  int2* bounds;        // [capacity] each tile's [q_begin, q_end)
  int* runs;           // run starts, then seqlen_q
  int* stretches;      // stretch starts, then seqlen_q
  int* count;          // the row's tiles
  int* block_counts;   // [blocks] run starts per block of queries
  int* block_runs;     // [blocks, kPlanPositionThreads] the block's run starts
};

__device__ RowWorkspace row_workspace(TilesParams const& p, int row) {
  int* const base = p.workspace + int64_t(row) * p.row_ints;
  int* const runs = base + 2 * p.capacity;
  int* const stretches = runs + p.seqlen_q + 1;
  int* const count = stretches + p.seqlen_q + 1;
  int const blocks = (p.seqlen_q + kPlanPositionThreads - 1) / kPlanPositionThreads;
  return {reinterpret_cast<int2*>(base), runs, stretches, count, count + 1, count + 1 + blocks};
}

// Of one value per warp (its lane 0's): the CTA's total, and the total of the warps before
// this thread's.
struct WarpPrefix {
  int before, total;
};

__device__ WarpPrefix warp_prefix(int warp_value, int* warp_values) {
  if (threadIdx.x % 32 == 0) { warp_values[threadIdx.x / 32] = warp_value; }
  __syncthreads();
  WarpPrefix r{0, 0};
#pragma unroll
  for (int w = 0; w < kPlanPositionWarps; ++w) {
    r.before += w < int(threadIdx.x / 32) ? warp_values[w] : 0;
    r.total += warp_values[w];
  }
  __syncthreads();
  return r;
}

// Grid: the row's blocks of kPlanPositionThreads queries, rows after one another.
__global__ void __launch_bounds__(kPlanPositionThreads) run_starts_kernel(TilesParams const p, int blocks) {
  __shared__ int warp_values[kPlanPositionWarps];
  int const row = int(blockIdx.x / unsigned(blocks));
  int const block = int(blockIdx.x % unsigned(blocks));
  int const i = block * kPlanPositionThreads + int(threadIdx.x);
  int4 const* const rows = p.q_rows + int64_t(row) * p.seqlen_q;
  bool const start = i < p.seqlen_q && (i == 0 || rows[i].x != rows[i - 1].x);
  unsigned const starts = __ballot_sync(0xffffffffu, start);
  WarpPrefix const prefix = warp_prefix(__popc(starts), warp_values);
  RowWorkspace const w = row_workspace(p, row);
  if (start) {
    int const rank = prefix.before + __popc(starts & ((1u << (threadIdx.x % 32)) - 1));
    w.block_runs[block * kPlanPositionThreads + rank] = i;
  }
  if (threadIdx.x == 0) { w.block_counts[block] = prefix.total; }
}

__global__ void __launch_bounds__(plans::kPlanThreads) row_tiles_kernel(TilesParams const p) {
  __shared__ plans::ScanStorage storage;
  int const row = blockIdx.x;
  int const n = p.seqlen_q;
  RowWorkspace const w = row_workspace(p, row);

  // The blocks' run starts, one list after another.
  plans::Chunk const b(int((n + kPlanPositionThreads - 1) / kPlanPositionThreads));
  int mine = 0;
  for (int k = b.begin; k < b.end; ++k) { mine += w.block_counts[k]; }
  int runs;
  int r = plans::cta_exclusive_scan(mine, plans::Sum{}, 0, storage, &runs);
  for (int k = b.begin; k < b.end; ++k) {
    for (int j = 0, c = w.block_counts[k]; j < c; ++j) { w.runs[r++] = w.block_runs[k * kPlanPositionThreads + j]; }
  }
  if (threadIdx.x == 0) { w.runs[runs] = n; }
  __syncthreads();
  // Run 0 always starts one: the queries before the first long run form a stretch.
  auto long_run = [&](int r) { return w.runs[r + 1] - w.runs[r] >= p.block_m; };
  int const stretches = plans::compact_row(
      runs, [&](int r) { return (r == 0) | long_run(r) | long_run(max(r - 1, 0)); },
      [&](int k, int r) { w.stretches[k] = w.runs[r]; }, storage);
  if (threadIdx.x == 0) { w.stretches[stretches] = n; }
  __syncthreads();

  // A tile every block_m queries of each stretch, numbered in order.
  plans::Chunk const c(stretches);
  auto tiles_of = [&](int k) { return (w.stretches[k + 1] - w.stretches[k] + p.block_m - 1) / p.block_m; };
  int my_tiles = 0;
  for (int k = c.begin; k < c.end; ++k) { my_tiles += tiles_of(k); }
  int total;
  int t = plans::cta_exclusive_scan(my_tiles, plans::Sum{}, 0, storage, &total);
  for (int k = c.begin; k < c.end; ++k) {
    int const stop = w.stretches[k + 1];
    for (int begin = w.stretches[k]; begin < stop; begin += p.block_m) {
      w.bounds[t++] = make_int2(begin, min(begin + p.block_m, stop));
    }
  }
  if (threadIdx.x == 0) { *w.count = total; }
}

// The sum over the CTA of one value per thread.
__device__ int cta_sum(int value, int* warp_values) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) { value += __shfl_xor_sync(0xffffffffu, value, d); }
  return warp_prefix(value, warp_values).total;
}

// Grid: ceil(capacity / kPlanPositionWarps) CTAs per row, rows after one another.
__global__ void __launch_bounds__(kPlanPositionThreads) tile_blocks_kernel(TilesParams const p, int ctas_per_row) {
  __shared__ int warp_values[kPlanPositionWarps];
  int const row = int(blockIdx.x / unsigned(ctas_per_row));
  int const t = int(blockIdx.x % unsigned(ctas_per_row)) * kPlanPositionWarps + int(threadIdx.x / 32);
  int const lane = threadIdx.x % 32;
  int before = 0, all = 0;
  for (int r = threadIdx.x; r < p.batch; r += blockDim.x) {
    int const c = *row_workspace(p, r).count;
    all += c;
    before += r < row ? c : 0;
  }
  before = cta_sum(before, warp_values);
  int const total = cta_sum(all, warp_values);
  if (t >= p.capacity) { return; }

  RowWorkspace const w = row_workspace(p, row);
  int const count = *w.count;
  int4* const plan = reinterpret_cast<int4*>(p.plan);  // two int4 per plan row
  if (row == 0 && t == 0 && lane == 0) { plan[0] = make_int4(total, 0, 0, 0), plan[1] = make_int4(0, 0, 0, 0); }
  if (t >= count) {
    // The rows' unused slots, in order, are the plan rows after the last tile.
    int64_t const r = 1 + total + (int64_t(row) * p.capacity - before) + (t - count);
    if (lane < 2) { plan[2 * r + lane] = make_int4(0, 0, 0, 0); }
    return;
  }
  int2 const q = w.bounds[t];
  int4 const* const rows = p.q_rows + int64_t(row) * p.seqlen_q;
  plans::TileKeyBlocks const b =
      plans::tile_key_blocks(plans::warp_tile_spans(rows, q.x, q.y), p.block_n, /*from_first_key=*/true);
  if (lane == 0) {
    int64_t const r = 1 + before + t;
    plan[2 * r] = make_int4(row, q.x, q.y, b.offset);
    plan[2 * r + 1] = make_int4(b.n_max, b.right, b.left, 0);
  }
}

}  // namespace

cudaError_t run_forward_tiles(TilesParams const& p, cudaStream_t stream) {
  if (p.batch == 0) { return cudaSuccess; }
  int const blocks = (p.seqlen_q + kPlanPositionThreads - 1) / kPlanPositionThreads;
  if (blocks > 0) {
    run_starts_kernel<<<unsigned(int64_t(blocks) * p.batch), kPlanPositionThreads, 0, stream>>>(p, blocks);
  }
  row_tiles_kernel<<<unsigned(p.batch), plans::kPlanThreads, 0, stream>>>(p);
  int const ctas_per_row = (p.capacity + kPlanPositionWarps - 1) / kPlanPositionWarps;
  tile_blocks_kernel<<<unsigned(int64_t(ctas_per_row) * p.batch), kPlanPositionThreads, 0, stream>>>(p, ctas_per_row);
  return cudaGetLastError();
}

}  // namespace jax_fa3
