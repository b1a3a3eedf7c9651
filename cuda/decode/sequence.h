// Where one sequence's keys live, and which of them a CTA's query rows see.
//
// Key position p of sequence b is, for p < cache_len, cache row page * page_size + p % page_size
// (page = page_table[b, p / page_size]; contiguous caches are the identity table page = b),
// and for cache_len <= p < total, row p - cache_len of k_new/v_new, which this same call also
// copies into the cache (append.h). The main loop reads new keys from k_new, never from the
// cache, so the copy needs no ordering against the reads.
#pragma once

#include <cstdint>

#include "decode/params.h"

namespace jax_fa3::decode {

// A key's source as one int: >= 0 a cache row, -1 nothing (the stage gets zeros), <= -2 the
// k_new row -2 - code. Cache rows fit in int32: the handler refuses num_pages * page_size >= 2^31.
constexpr int kNoRow = -1;

__device__ __forceinline__ int new_row_code(int new_row) { return -2 - new_row; }

template <bool kPaged>
struct Sequence {
  DecodeParams const& p;
  int batch;
  int cache_len;  // entries already in the cache
  int total;      // cache_len + seqlen_new: the keys attended
  bool length_ok;

  __device__ Sequence(DecodeParams const& params, int b) : p(params), batch(b) {
    int const len = p.cache_seqlens[b];
    int64_t const end = int64_t(len) + p.seqlen_new;
    length_ok = len >= 0 && end <= p.capacity;
    cache_len = length_ok ? len : 0;
    total = length_ok ? int(end) : 0;
  }

  // The cache row of position `pos` (< capacity), or -1 when its page-table entry is out of
  // range. A contiguous cache is one page per sequence (no division); a power-of-two page
  // size divides by a shift.
  __device__ int cache_row(int pos) const {
    if constexpr (!kPaged) {
      return batch * p.page_size + pos;
    } else {
      int const slot = p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size;
      int const page = p.page_table[int64_t(batch) * p.max_pages + slot];
      return page >= 0 && page < p.num_pages ? page * p.page_size + (pos - slot * p.page_size) : -1;
    }
  }

  // Where key `key` is read from (see kNoRow). A bad page reads nothing: the split that
  // checks that page (pages_ok) turns the sequence's output to NaN.
  __device__ int row_code(int key) const {
    if (key < 0 || key >= total) { return kNoRow; }
    if (key >= cache_len) { return new_row_code(batch * p.seqlen_new + key - cache_len); }
    int const row = cache_row(key);
    return row < 0 ? kNoRow : row;
  }

  // Whether this split's share of the pages covering [0, total) is in range. The splits
  // share the pages out whatever their keys are, so a bad entry outside a window is found too.
  __device__ bool pages_ok(int split, int num_splits, int thread, int threads) const {
    if constexpr (!kPaged) {
      return true;
    } else {
      int const pages = int((int64_t(total) + p.page_size - 1) / p.page_size);
      int const per_split = (pages + num_splits - 1) / num_splits;
      int const first = split * per_split;
      int const last = min(pages, first + per_split);
      bool ok = true;
      for (int i = first + thread; i < last; i += threads) {
        int const page = p.page_table[int64_t(batch) * p.max_pages + i];
        ok &= page >= 0 && page < p.num_pages;
      }
      return ok;
    }
  }
};

// The keys one query row sees under the causal/window mask. Query token i sits at position
// total - seqlen_q + i (bottom-right alignment, as in flash_attention); padding rows see none.
struct RowWindow {
  int begin, end;  // row sees keys [begin, end); empty for padding rows

  __device__ static RowWindow of(DecodeParams const& p, int total, int row_in_batch) {
    int const group = p.heads / p.kv_heads;
    if (row_in_batch >= group * p.seqlen_q) { return {0, 0}; }
    int64_t const position = int64_t(total) - p.seqlen_q + row_in_batch / group;
    int64_t const begin = p.window_left >= 0 ? max(int64_t(0), position - p.window_left) : 0;
    int64_t const end = p.window_right >= 0 ? min(int64_t(total), position + p.window_right + 1) : total;
    int const first = int(min(begin, int64_t(total)));
    return {first, int(max(int64_t(first), end))};
  }
};

}  // namespace jax_fa3::decode
