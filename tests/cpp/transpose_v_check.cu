// Host check of the FP8 forward's V transpose (cuda/fwd/transpose_v.h), no GPU needed:
// emulates ldmatrix.x4.trans / byte permutes / stmatrix.x4 on the shared-memory offsets the
// transposer computes, and checks every V^T byte against cute's swizzled layouts and the key
// order P's registers use; counts bank conflicts per 8x8 matrix (ways; 1 = none).
// Built by tests/test_kernel_arithmetic.py with nvcc (host code only).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include "fwd/traits.h"
#include "fwd/transpose_v.h"
using namespace jax_fa3;
static uint32_t host_byte_perm(uint32_t a, uint32_t b, uint32_t s) { uint64_t x = (uint64_t(b) << 32) | a; uint32_t r = 0; for (int k = 0; k < 4; ++k) r |= uint32_t((x >> (8 * ((s >> (4 * k)) & 7))) & 0xff) << (8 * k); return r; }
template <int D>
int check() {
  using T = FwdTraits<cutlass::float_e4m3_t, cutlass::bfloat16_t, D, D, false>;
  using A = VTransposeAddressing<T>;
  constexpr int N = T::kBlockN;
  alignas(1024) static uint8_t vbuf[1 << 16], vtbuf[1 << 16];
  auto sV = make_tensor(make_smem_ptr(vbuf), typename A::LoadLayout{});
  auto sVt = make_tensor(make_smem_ptr(vtbuf), typename A::StoreLayout{});
  for (int i = 0; i < A::kStageBytes; ++i) vbuf[i] = rand() & 0xff;
  memset(vtbuf, 0, sizeof vtbuf);
  int worst_load = 0, worst_store = 0;
  for (int unit = 0; unit < A::kUnits; ++unit) {
    uint32_t regs[32][4];
    int load_addr[32], store_addr[32];
    for (int lane = 0; lane < 32; ++lane) {
      load_addr[lane] = A::load_offset(A::lane_load(lane), unit);
      store_addr[lane] = A::store_offset(A::lane_store(lane), unit);
    }
    for (int m = 0; m < 4; ++m) {  // bank ways of each 8-row phase
      std::set<int> lw[32], sw[32];
      for (int r = 0; r < 8; ++r)
        for (int w = 0; w < 4; ++w) {
          int a = load_addr[8 * m + r] / 4 + w, b = store_addr[8 * m + r] / 4 + w;
          lw[a % 32].insert(a); sw[b % 32].insert(b);
        }
      for (int b = 0; b < 32; ++b) { worst_load = std::max<int>(worst_load, lw[b].size()); worst_store = std::max<int>(worst_store, sw[b].size()); }
    }
    for (int t = 0; t < 32; ++t)
      for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;  // T[t/4][2q], T[t/4][2q+1]; T[i][j] = M[j][i] = b16 at row j, column i
        int p = t / 4, q = t % 4;
        memcpy(&lo, vbuf + load_addr[8 * m + 2 * q] + 2 * p, 2);
        memcpy(&hi, vbuf + load_addr[8 * m + 2 * q + 1] + 2 * p, 2);
        regs[t][m] = lo | (uint32_t(hi) << 16);
      }
    for (int t = 0; t < 32; ++t) {
      uint32_t e = A::even_select(t), o = A::odd_select(t);
      uint32_t out[4] = {host_byte_perm(regs[t][0], regs[t][1], e), host_byte_perm(regs[t][0], regs[t][1], o),
                         host_byte_perm(regs[t][2], regs[t][3], e), host_byte_perm(regs[t][2], regs[t][3], o)};
      for (int m = 0; m < 4; ++m) memcpy(vtbuf + store_addr[8 * m + t / 4] + 4 * (t % 4), &out[m], 4);
    }
  }
  int bad = 0;
  for (int d = 0; d < D; ++d)
    for (int pos = 0; pos < N; ++pos) {
      int g = pos / 16 * 16, w = (pos % 16) / 4, i = pos % 4;
      int key = g + 2 * w + (i & 1) + 8 * (i >> 1);
      if (sVt(d, pos) != sV(key, d)) { if (bad++ < 5) printf("d%d V^T(%d, %d) wrong\n", D, d, pos); }
    }
  printf("d%d N%d: %d wrong V^T bytes of %d; worst bank ways per matrix: ldmatrix %d stmatrix %d\n", D, N, bad, D * N,
         worst_load, worst_store);
  return bad;
}
int main() { return check<64>() + check<128>() + check<256>(); }
