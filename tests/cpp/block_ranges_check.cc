// Checks the tile-range arithmetic of the kernels against brute force, on the host:
// - forward: KeyBlockRange(m) holds exactly the key blocks with a visible (query, key)
//   pair, and every tile it runs unmasked is fully visible;
// - backward: QueryBlocks(n) visits exactly the query blocks with a visible pair (the
//   deterministic dQ order deadlocks otherwise), and needs_mask() is true wherever a
//   tile holds an invisible pair.
// Every tile shape the kernels use, read from their tile tables (fwd/config.h,
// bwd/config.h) for the compiled head dims, which the build passes in as
// JAX_FA3_FWD_HEAD_DIMS and JAX_FA3_BWD_HEAD_DIMS (tests/test_kernel_arithmetic.py reads
// them from cuda/instantiations/).
// Prints a line "tile fwd d<head dim> <no-window|window> <M>x<N>" or "tile bwd d<head dim>
// <M>x<N>" per table row
// checked, then "ok" and exits 0; or prints the first failing case and exits 1.
#include <cstdio>
#include <random>
#include <utility>

#include "bwd/config.h"
#include "bwd/query_blocks.h"
#include "common/block_ranges.h"
#include "fwd/config.h"

#if !defined(JAX_FA3_FWD_HEAD_DIMS) || !defined(JAX_FA3_BWD_HEAD_DIMS) || !defined(JAX_FA3_FP8_FWD_HEAD_DIMS)
#error "define JAX_FA3_FWD_HEAD_DIMS, JAX_FA3_FP8_FWD_HEAD_DIMS and JAX_FA3_BWD_HEAD_DIMS, e.g. -DJAX_FA3_FWD_HEAD_DIMS=64,128"
#endif

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
    std::printf("FAIL %s (%s %dx%d): Sq=%d Sk=%d wl=%d wr=%d off=%d m=%d n=%d\n", what, label, kBlockM, kBlockN,
                pr.seqlen_q, pr.seqlen_k, pr.window_left, pr.window_right, pr.diagonal_offset, m, n);
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

// The forward's two rows of a head dim (without and with a window) for 16-bit (2) or FP8 (1)
// inputs, and the backward's one.
template <int kHeadDim, int kElementBytes = 2>
bool check_fwd(Problem const& pr, bool print) {
  using Plain = jax_fa3::FwdTileConfig<kElementBytes, kHeadDim, false>;
  using Windowed = jax_fa3::FwdTileConfig<kElementBytes, kHeadDim, true>;
  using ShortWindowed = jax_fa3::FwdTileConfig<kElementBytes, kHeadDim, true, true>;
  char const* direction = kElementBytes == 1 ? "fwd-fp8" : "fwd";
  if (print) {
    std::printf("tile %s d%d no-window %dx%d\n", direction, kHeadDim, Plain::kBlockM, Plain::kBlockN);
    std::printf("tile %s d%d window %dx%d\n", direction, kHeadDim, Windowed::kBlockM, Windowed::kBlockN);
    std::printf("tile %s d%d short-window %dx%d\n", direction, kHeadDim, ShortWindowed::kBlockM,
                ShortWindowed::kBlockN);
  }
  return check<Plain::kBlockM, Plain::kBlockN>(pr, "fwd no-window") &&
         check<Windowed::kBlockM, Windowed::kBlockN>(pr, "fwd window") &&
         check<ShortWindowed::kBlockM, ShortWindowed::kBlockN>(pr, "fwd short-window");
}

template <int kHeadDim>
bool check_bwd(Problem const& pr, bool print) {
  using Config = jax_fa3::BwdTileConfig<kHeadDim>;
  if (print) { std::printf("tile bwd d%d %dx%d\n", kHeadDim, Config::kBlockM, Config::kBlockN); }
  return check<Config::kBlockM, Config::kBlockN>(pr, "bwd");
}

template <int... kFwdHeadDims, int... kFp8HeadDims, int... kBwdHeadDims>
bool check_all(Problem const& pr, bool print, std::integer_sequence<int, kFwdHeadDims...>,
               std::integer_sequence<int, kFp8HeadDims...>, std::integer_sequence<int, kBwdHeadDims...>) {
  return (check_fwd<kFwdHeadDims>(pr, print) && ...) && (check_fwd<kFp8HeadDims, 1>(pr, print) && ...) &&
         (check_bwd<kBwdHeadDims>(pr, print) && ...);
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
    if (!check_all(pr, trial == 0, std::integer_sequence<int, JAX_FA3_FWD_HEAD_DIMS>{},
                   std::integer_sequence<int, JAX_FA3_FP8_FWD_HEAD_DIMS>{},
                   std::integer_sequence<int, JAX_FA3_BWD_HEAD_DIMS>{})) {
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}
