// Prints the bytes the backward kernels carve from their workspace (cuda/bwd/workspace.h)
// for each line "batch seqlen_q seqlen_k heads kv_heads head_dim deterministic sinks" on stdin,
// head_dim being a compiled backward head dim. tests/test_kernel_arithmetic.py checks that
// Python's bwd_workspace_bytes is never smaller.
#include <cstdio>
#include <iostream>

#include "bwd/config.h"
#include "bwd/workspace.h"

template <int kHeadDim>
long long bytes(long long b, long long sq, long long sk, long long h, long long hk, bool deterministic,
                bool sinks) {
  using Config = jax_fa3::BwdTileConfig<kHeadDim>;
  return jax_fa3::BwdWorkspace::carve(nullptr, b, h, hk, sq, sk, kHeadDim, kHeadDim, Config::kBlockM,
                                      Config::kBlockN, deterministic,
                                      sinks ? jax_fa3::preprocess_blocks<kHeadDim>(sq) : 0)
      .bytes;
}

int main() {
  long long b, sq, sk, h, hk, d;
  int deterministic, sinks;
  while (std::cin >> b >> sq >> sk >> h >> hk >> d >> deterministic >> sinks) {
    long long const n = d == 64    ? bytes<64>(b, sq, sk, h, hk, deterministic, sinks)
                        : d == 128 ? bytes<128>(b, sq, sk, h, hk, deterministic, sinks)
                                   : bytes<256>(b, sq, sk, h, hk, deterministic, sinks);
    std::printf("%lld\n", n);
  }
  return 0;
}
