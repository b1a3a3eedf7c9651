// The dynamic tile scheduler's order (common/tile_scheduler.h) is set by one number from the
// host: how many query heads share an L2 section. Plain C++, also compiled on the host by
// tests/cpp/tile_order_check.cc.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/params.h"

namespace jax_fa3 {

// A window that hides no key from any row (run_fwd's short-keys path: row i sees
// [i - seqlen_q, i + seqlen_k]).
inline bool window_hides_no_key(FwdParams const& fp) {
  int64_t const offset = fp.diagonal_offset;
  return fp.window_left >= 0 && fp.window_right >= 0 && fp.seqlen_q - 1 + offset - fp.window_left <= 0 &&
         offset + fp.window_right >= fp.seqlen_k - 1;
}

// No window, or one that hides nothing: every tile of a row of the batch costs the same.
inline bool tiles_cost_the_same(FwdParams const& fp) {
  return (fp.window_left < 0 && fp.window_right < 0) || window_hides_no_key(fp);
}

// Query heads per L2 section: as many heads' K and V as fit in about 32 MB of the 50 MB L2,
// counted in query heads. Inside a section heads run fastest. Where every tile costs the
// same, one head per section puts a head's m_blocks next to each other, so the CTAs of a
// wave share its K and V (measured on the H200 at d128 512-4k non-causal: +2-4% against heads
// fastest; benchmarks/NOTES.md, session 14).
inline int heads_per_l2_section(FwdParams const& fp, int element_bytes) {
  if (!fp.q_rows && tiles_cost_the_same(fp)) { return 1; }
  int64_t const kv_bytes_per_head = int64_t(fp.seqlen_k) * (fp.head_dim + fp.head_dim_v) * element_bytes;
  int64_t const kv_heads_in_l2 = std::max<int64_t>(1, (int64_t(32) << 20) / kv_bytes_per_head);
  int64_t const group = fp.heads / fp.kv_heads;
  return int(std::min<int64_t>(kv_heads_in_l2 * group, int64_t(fp.batch) * fp.heads));
}

}  // namespace jax_fa3
