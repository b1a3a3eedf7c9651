// Prints "num_blocks workspace_bytes" of the FP8 quantizer (cuda/quantize/geometry.h) for each
// line "batch seqlen heads block_rows" on stdin (block_rows 0: one block per batch and
// head). tests/test_fp8_quantize.py checks Python's num_blocks and workspace_bytes against them.
#include <cstdio>
#include <iostream>

#include "quantize/geometry.h"

int main() {
  long long batch, seqlen, heads, block_rows;
  while (std::cin >> batch >> seqlen >> heads >> block_rows) {
    jax_fa3::QuantizeGeometry const g = jax_fa3::quantize_geometry(seqlen, block_rows);
    std::printf("%lld %lld\n", static_cast<long long>(g.num_blocks),
                static_cast<long long>(g.workspace_bytes(batch, heads)));
  }
  return 0;
}
