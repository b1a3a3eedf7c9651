// 2^x on the FMA pipe instead of the MUFU unit, which does only 16 exp2 a cycle per SM: the
// forward's softmax takes a share of a tile's exp2 here so that they run beside the others
// (the share is a column of the forward tile tables, fwd/config.h). Plain float arithmetic,
// also compiled on the host by tests/cpp/exp2_on_fma_check.cc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace jax_fa3 {

// max(x, low), but NaN for a NaN x (fmaxf would return low).
JAX_FA3_HOST_DEVICE float max_keeping_nan(float x, float low) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(low));
  return y;
#else
  return x != x ? x : fmaxf(x, low);
#endif
}

// For x <= 127: x = j + f with j = round(x) and |f| <= 1/2; 2^f is a cubic (relative error
// 1.0e-4, exact at f = 0: far inside bf16's and e4m3's rounding), times 2^j built in the
// exponent bits. Adding 1.5 * 2^23 rounds x and leaves j in t's low mantissa bits, so t's
// bits shifted by 23 are j << 23. x is clamped to -126, so -inf (a masked score) gives at
// most 2^-126, zero to the flush-to-zero arithmetic after it; NaN stays NaN, as with MUFU.
JAX_FA3_HOST_DEVICE float exp2_on_fma(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = max_keeping_nan(x, -126.f);
  float const t = x + kRound;
  float const f = x - (t - kRound);
  float const p = fmaf(fmaf(fmaf(0.05500858f, f, 0.24221037f), f, 0.6932829f), f, 1.f);
  uint32_t t_bits;
  memcpy(&t_bits, &t, 4);
  uint32_t const scale_bits = (t_bits << 23) + 0x3f800000u;  // 2^j: j + 127 in the exponent
  float scale;
  memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

}  // namespace jax_fa3
