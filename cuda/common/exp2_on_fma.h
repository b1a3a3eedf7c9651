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

// t = x + 1.5 * 2^23 rounded down: floor(x) lands in t's low mantissa bits.
JAX_FA3_HOST_DEVICE float add_round_down(float x, float magic) {
#if defined(__CUDA_ARCH__)
  return __fadd_rd(x, magic);
#else
  return std::floor(x) + magic;  // the same value for |x| < 2^22
#endif
}

// For -inf <= x <= 127: x = j + f with j = floor(x) and 0 <= f < 1; 2^f is a cubic (relative
// error 8.6e-5, exact at f = 0: far inside bf16's and e4m3's rounding) and j is added into
// its exponent bits (a signed add: one IMAD, shift and add together; no FMUL). x is clamped
// to -127, so -inf (a masked score) gives less than 2^-126, zero to the flush-to-zero
// arithmetic after it. NaN is not kept here: the softmax keeps it upstream (a NaN score
// makes its row's maximum NaN, so the row's MUFU columns are NaN too).
JAX_FA3_HOST_DEVICE float exp2_on_fma(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = fmaxf(x, -127.f);
  float const t = add_round_down(x, kRound);
  float const f = x - (t - kRound);
  float const p = fmaf(fmaf(fmaf(0.07706602f, f, 0.22764611f), f, 0.6951165f), f, 1.f);
  int32_t p_bits, t_bits;
  memcpy(&p_bits, &p, 4);
  memcpy(&t_bits, &t, 4);
  int32_t const bits = p_bits + int32_t(uint32_t(t_bits) << 23);
  float y;
  memcpy(&y, &bits, 4);
  return y;
}

}  // namespace jax_fa3
