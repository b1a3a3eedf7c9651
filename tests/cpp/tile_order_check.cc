// Checks the dynamic scheduler's section size (cuda/fwd/tile_order.h) on the host:
// - window_hides_no_key against brute force over small problems: never true where some row
//   misses a key, and true wherever a two-sided window hides nothing;
// - one head per section without a window and for run_fwd's short-keys window, the L2-sized
//   section otherwise (causal, a window that hides a key, packed sequences).
// Prints one line per check group, then "ok" and exits 0; or the first failure and exits 1.
#include <cstdio>

#include "fwd/tile_order.h"

namespace {

using jax_fa3::FwdParams;

FwdParams problem(int seqlen_q, int seqlen_k, int window_left, int window_right, int diagonal_offset) {
  FwdParams fp{};
  fp.batch = 32, fp.heads = 16, fp.kv_heads = 16, fp.head_dim = 128, fp.head_dim_v = 128;
  fp.seqlen_q = seqlen_q, fp.seqlen_k = seqlen_k;
  fp.window_left = window_left, fp.window_right = window_right, fp.diagonal_offset = diagonal_offset;
  return fp;
}

// Row i sees key j iff j < seqlen_k and c - left <= j <= c + right, c = i + offset (a negative
// side is unbounded): common/mask.h's rule.
bool brute_force_hides_none(FwdParams const& fp) {
  for (int i = 0; i < fp.seqlen_q; ++i) {
    for (int j = 0; j < fp.seqlen_k; ++j) {
      int const c = i + fp.diagonal_offset;
      bool const seen = (fp.window_left < 0 || j >= c - fp.window_left) && (fp.window_right < 0 || j <= c + fp.window_right);
      if (!seen) { return false; }
    }
  }
  return true;
}

}  // namespace

int main() {
  long cases = 0;
  for (int sq = 1; sq <= 7; ++sq) {
    for (int sk = 1; sk <= 7; ++sk) {
      for (int left = -1; left <= 8; ++left) {
        for (int right = -1; right <= 8; ++right) {
          for (int offset = -8; offset <= 8; ++offset) {
            FwdParams const fp = problem(sq, sk, left, right, offset);
            bool const rule = jax_fa3::window_hides_no_key(fp), truth = brute_force_hides_none(fp);
            bool const two_sided = left >= 0 && right >= 0;
            if ((rule && !truth) || (two_sided && rule != truth)) {
              std::printf("FAILED window_hides_no_key sq %d sk %d left %d right %d offset %d: %d, brute force %d\n",
                          sq, sk, left, right, offset, int(rule), int(truth));
              return 1;
            }
            ++cases;
          }
        }
      }
    }
  }
  std::printf("window_hides_no_key %ld cases\n", cases);

  int const bf16 = 2;
  for (int seqlen : {512, 1000, 4096}) {
    FwdParams const wide = problem(seqlen, seqlen, seqlen, seqlen, 0);  // run_fwd's short-keys window
    FwdParams const none = problem(seqlen, seqlen, -1, -1, 0);
    FwdParams const causal = problem(seqlen, seqlen, -1, 0, 0);
    FwdParams const hides_one = problem(seqlen, seqlen, seqlen - 2, seqlen, 0);  // the last row misses key 0
    FwdParams packed = wide;
    int rows = 0;
    packed.q_rows = &rows;
    int const l2_heads = jax_fa3::heads_per_l2_section(causal, bf16);
    if (jax_fa3::heads_per_l2_section(wide, bf16) != 1 || jax_fa3::heads_per_l2_section(none, bf16) != 1 ||
        l2_heads <= 1 ||
        jax_fa3::heads_per_l2_section(hides_one, bf16) != l2_heads ||
        jax_fa3::heads_per_l2_section(packed, bf16) != l2_heads) {
      std::printf("FAILED heads_per_l2_section at seqlen %d (L2 section %d heads)\n", seqlen, l2_heads);
      return 1;
    }
  }
  std::printf("heads_per_l2_section one head without a window or under the short-keys window only\n");
  std::printf("ok\n");
  return 0;
}
