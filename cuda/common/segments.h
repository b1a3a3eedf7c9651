// Packed sequences (segment ids, varlen): the mask given row by row instead of by the
// window rule. jax_fa3/segments.py builds, per batch row, from the ids, lengths and window:
//   q_rows[i]  = {id, first key, end key, interleaved}: query i sees key j iff
//                first <= j < end and, where interleaved, kv_rows[j].id == id;
//   kv_rows[j] = {id, first query, end query, interleaved}: the same rule from the key's
//                side (the backward's rows are keys).
// `interleaved` is set where the row's id recurs non-contiguously on the other side, so the
// interval alone would over-include; contiguous documents never need the id comparison.
// A row that sees nothing has first = end = 0. The tile plans (which blocks a tile visits,
// which of them are fully visible) come from the same rows, see KeyBlockRange(plan).
#pragma once

#include <cstdint>
#include <cute/tensor.hpp>

#include "common/layouts.h"
#include "common/mask.h"

namespace jax_fa3 {

using namespace cute;

// This thread's accumulator rows of one tile, as spans of visible columns.
template <int kRows>
struct RowSpans {
  int id[kRows], first[kRows], end[kRows];
  bool interleaved;  // some row needs the id comparison

  // rows: the batch row's descriptors; tile_rows[r]: this thread's rows within the tile.
  __device__ __forceinline__ void load(int4 const* rows, int length, int64_t first_row, int const (&tile_rows)[kRows]) {
    interleaved = false;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int64_t const row = first_row + tile_rows[r];
      int4 const d = row < length ? __ldg(rows + row) : make_int4(-1, 0, 0, 0);
      id[r] = d.x;
      first[r] = d.y;
      end[r] = d.z;
      interleaved |= d.w != 0;
    }
  }

  // Masks a (rows, columns) score tile whose thread-0 columns are thread0_coords and whose
  // first column for this thread is column0. columns: the other side's descriptors (for
  // their ids), `length` of them.
  template <int kColumns, class Engine, class Layout, class Thread0Coords>
  __device__ __forceinline__ void apply(Tensor<Engine, Layout>& acc, Thread0Coords const& thread0_coords,
                                        int64_t column0, int4 const* columns, int length) const {
    int lo[kRows], hi[kRows];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      lo[r] = clamp_to_tile<kColumns>(first[r], column0);
      hi[r] = clamp_to_tile<kColumns>(end[r], column0);
    }
    mask_outside(acc, thread0_coords, lo, hi);
    if (interleaved) {
      Tensor s = make_tensor(acc.data(), acc_rows_cols(acc.layout()));
      Tensor c = make_tensor(thread0_coords.data(), acc_rows_cols(thread0_coords.layout()));
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        int64_t const column = column0 + get<1>(c(0, j));
        int const other = column < length ? __ldg(&columns[column].x) : -1;
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          if (other != id[r]) { s(r, j) = -INFINITY; }
        }
      }
    }
  }
};

}  // namespace jax_fa3
