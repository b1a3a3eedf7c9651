// Which key blocks a tile of query rows visits, and which of them all its rows see whole
// (segments.py's _key_blocks): one warp per tile reduces the rows' spans, lane 0 gets the
// blocks.
#pragma once

#include "plans/params.h"

namespace jax_fa3::plans {

// Floor and ceiling of a / b for b > 0, as Python's // rounds (toward -inf).
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return -floor_div(-a, b); }

struct TileKeyBlocks {
  int offset;          // block n's keys start at offset + n * block_n
  int n_min, n_max;    // the blocks the tile visits
  int right, left;     // of those, [left, right) are seen whole by every row
};

// The reductions of the rows [begin, end) of `rows` by the calling warp; every lane gets them.
struct TileSpans {
  int lowest = kPlanFar, highest = 0;         // over the rows that see a key
  int common_first = 0, common_end = kPlanFar;  // over all rows; a row not seen whole: none

  __device__ void add(int4 row) {
    int const first = row.y, end = row.z;
    bool const sees = first < end;
    bool const whole = sees && row.w == 0;
    if (sees) { lowest = min(lowest, first), highest = max(highest, end); }
    common_first = max(common_first, whole ? first : kPlanFar);
    common_end = min(common_end, whole ? end : 0);
  }

  __device__ void reduce_warp() {
#pragma unroll
    for (int d = 16; d > 0; d /= 2) {
      lowest = min(lowest, __shfl_xor_sync(0xffffffffu, lowest, d));
      highest = max(highest, __shfl_xor_sync(0xffffffffu, highest, d));
      common_first = max(common_first, __shfl_xor_sync(0xffffffffu, common_first, d));
      common_end = min(common_end, __shfl_xor_sync(0xffffffffu, common_end, d));
    }
  }
};

__device__ inline TileSpans warp_tile_spans(int4 const* rows, int begin, int end) {
  TileSpans spans;
  for (int i = begin + int(threadIdx.x % 32); i < end; i += 32) { spans.add(rows[i]); }
  spans.reduce_warp();
  return spans;
}

// Blocks numbered from key 0, or (`from_first_key`) from the tile's first visible key.
__device__ inline TileKeyBlocks tile_key_blocks(TileSpans const& s, int block_n, bool from_first_key) {
  bool const empty = s.highest == 0;
  TileKeyBlocks b;
  b.offset = from_first_key && !empty ? s.lowest : 0;
  b.n_min = empty ? 0 : floor_div(s.lowest - b.offset, block_n);
  b.n_max = empty ? 0 : ceil_div(s.highest - b.offset, block_n);
  int const left = min(max(ceil_div(s.common_first - b.offset, block_n), b.n_min), b.n_max);
  int const right = min(max(floor_div(s.common_end - b.offset, block_n), left), b.n_max);
  bool const none_whole = right <= left;
  b.right = none_whole ? b.n_min : right;
  b.left = none_whole ? b.n_min : left;
  return b;
}

}  // namespace jax_fa3::plans
