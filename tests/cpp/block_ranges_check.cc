// Checks the tile-range arithmetic of the kernels against brute force, on the host:
// - forward: KeyBlockRange(m) holds exactly the key blocks with a visible (query, key)
//   pair, and every tile it runs unmasked is fully visible;
// - backward: QueryBlocks(n) visits exactly the query blocks with a visible pair (the
//   deterministic dQ order deadlocks otherwise), and needs_mask() is true wherever a
//   tile holds an invisible pair.
// Prints "ok" and exits 0, or prints the first failing case and exits 1.
#include <cstdio>
#include <random>

#include "bwd/query_blocks.h"
#include "common/block_ranges.h"

namespace {

struct Problem {
  int seqlen_q, seqlen_k, window_left, window_right, diagonal_offset;

  bool visible(int64_t i, int64_t j) const {
    int64_t const c = i + diagonal_offset;
    return i < seqlen_q && j < seqlen_k && (window_left < 0 || j >= c - window_left) &&
           (window_right < 0 || j <= c + window_right);
  }
  bool visible_window(int64_t i, int64_t j) const {  // ignoring the lengths
    int64_t const c = i + diagonal_offset;
    return (window_left < 0 || j >= c - window_left) && (window_right < 0 || j <= c + window_right);
  }
};

template <int kBlockM, int kBlockN>
bool check(Problem const& pr, char const* label) {
  int const m_blocks = (pr.seqlen_q + kBlockM - 1) / kBlockM;
  int const n_blocks = (pr.seqlen_k + kBlockN - 1) / kBlockN;
  auto fail = [&](char const* what, int m, int n) {
    std::printf("FAIL %s (%s): Sq=%d Sk=%d wl=%d wr=%d off=%d m=%d n=%d\n", what, label, pr.seqlen_q, pr.seqlen_k,
                pr.window_left, pr.window_right, pr.diagonal_offset, m, n);
    return false;
  };
  for (int n = 0; n < n_blocks; ++n) {
    jax_fa3::QueryBlocks<kBlockM, kBlockN> const qb(n, pr.seqlen_q, pr.seqlen_k, pr.window_left, pr.window_right,
                                                     pr.diagonal_offset);
    for (int m = 0; m < m_blocks; ++m) {
      bool any = false, all_window = true;
      for (int i = m * kBlockM; i < (m + 1) * kBlockM; ++i) {
        for (int j = n * kBlockN; j < (n + 1) * kBlockN; ++j) {
          any |= pr.visible(i, j);
          all_window &= pr.visible_window(i, j) && j < pr.seqlen_k;
        }
      }
      jax_fa3::KeyBlockRange<kBlockM, kBlockN> const kr(m, pr.seqlen_q, pr.seqlen_k, pr.window_left,
                                                         pr.window_right, pr.diagonal_offset);
      bool const in_fwd = !kr.empty() && n >= kr.n_block_min && n < kr.n_block_max;
      if (in_fwd != any) { return fail("forward key range", m, n); }
      bool const fwd_unmasked = n < kr.n_block_right_masked && n >= kr.n_block_left_masked;
      if (in_fwd && fwd_unmasked) {  // rows past seqlen_q are zeroed later and may be garbage
        for (int i = m * kBlockM; i < std::min((m + 1) * kBlockM, pr.seqlen_q); ++i) {
          for (int j = n * kBlockN; j < (n + 1) * kBlockN; ++j) {
            if (!pr.visible(i, j)) { return fail("forward unmasked tile has an invisible pair", m, n); }
          }
        }
      }
      bool const in_range = m >= qb.m_begin && m < qb.m_end;
      if (qb.visits(m) != any) { return fail("backward visits", m, n); }
      if (any && !in_range) { return fail("backward m range", m, n); }
      if (any && !qb.needs_mask(m) && !all_window) { return fail("backward unmasked tile has an invisible pair", m, n); }
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 3000; ++trial) {
    Problem pr{uniform(1, 600), uniform(1, 600), -1, -1, 0};
    switch (uniform(0, 3)) {
      case 0: pr.window_right = 0; break;                                         // causal
      case 1: pr.window_left = uniform(0, 300); pr.window_right = uniform(0, 300); break;  // local
      case 2: pr.window_left = uniform(0, 300); break;                            // left only
      default: break;                                                             // none
    }
    switch (uniform(0, 2)) {
      case 0: pr.diagonal_offset = pr.seqlen_k - pr.seqlen_q; break;  // bottom-right
      case 1: pr.diagonal_offset = 0; break;                          // top-left
      default: pr.diagonal_offset = uniform(-700, 700); break;
    }
    if (!check<64, 128>(pr, "64x128") || !check<128, 176>(pr, "128x176") || !check<128, 80>(pr, "128x80") ||
        !check<128, 128>(pr, "128x128")) {
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}
