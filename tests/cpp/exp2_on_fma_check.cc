// Host check of exp2_on_fma (cuda/common/exp2_on_fma.h) against exp2 in double precision,
// over the arguments the forward's softmax gives it (scores minus the row maximum, <= 0, or
// up to +8 with the FP8 offset). Built by tests/test_kernel_arithmetic.py with the host
// compiler (no GPU): the same float operations as on the device, where subnormal results
// flush to zero.
#include <cmath>
#include <cstdio>
#include <limits>

#include "common/exp2_on_fma.h"

int main() {
  using jax_fa3::exp2_on_fma;
  double worst = 0.0, worst_at = 0.0;
  long samples = 0;
  // Every 2^-14 from -126 to 8.5: 2.2 million arguments, all fractional positions.
  for (double x = -126.0; x <= 8.5; x += 1.0 / 16384) {
    float const xf = float(x);
    double const error = std::fabs(double(exp2_on_fma(xf)) / std::exp2(double(xf)) - 1.0);
    if (error > worst) { worst = error, worst_at = xf; }
    ++samples;
  }
  int inexact_integers = 0;
  for (int j = -126; j <= 8; ++j) { inexact_integers += exp2_on_fma(float(j)) != std::ldexp(1.0f, j); }
  float const masked = exp2_on_fma(-std::numeric_limits<float>::infinity());
  float const below = exp2_on_fma(-1000.f);
  std::printf("samples %ld worst relative error %.3e at %.6f\n", samples, worst, worst_at);
  std::printf("inexact integers %d\n", inexact_integers);
  std::printf("-inf gives %.3e, -1000 gives %.3e (bound 2^-126 = %.3e)\n", masked, below, std::ldexp(1.0, -126));
  bool const ok = worst < 9e-5 && inexact_integers == 0 && masked >= 0.f && masked <= std::ldexp(1.0f, -126) &&
                  below >= 0.f && below <= std::ldexp(1.0f, -126);
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
