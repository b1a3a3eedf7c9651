"""FP8 forward calls for compute-sanitizer (memcheck: out-of-bounds accesses; racecheck: the
on-chip V transpose's shared-memory hand-offs): every FP8 head dim, odd lengths, causal with
seqlen_q != seqlen_k, a window, GQA, per-block descales, the quantizer of fp8_attention, and
the quantizer alone (every input dtype; one slab, several, and blocks of two launches).
Exits non-zero when an output holds NaN (outputs are poisoned before each launch)."""

import math
import os
import sys

os.environ.setdefault("JAX_FA3_DEBUG_POISON", "1")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
import kernel_ffi  # noqa: E402

import jax_fa3  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  blocks = kernel_ffi.descale_blocks()
  failures = 0
  for (dtype, out_dtype, d), (q_rows, k_rows) in sorted(blocks.items()):
    for sq, sk, window in ((333, 517, (-1, -1)), (517, 333, (-1, 0)), (1000, 1000, (64, 16))):
      b, h, hk = 2, 4, 2
      e4m3 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float8_e4m3fn)
      q, k, v = e4m3(b, sq, h, d), e4m3(b, sk, hk, d), e4m3(b, sk, hk, d)
      dq = jnp.asarray(rng.uniform(0.5, 1.5, (b, h, -(-sq // q_rows))), jnp.float32)
      dk = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk, -(-sk // k_rows))), jnp.float32)
      dv = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk)), jnp.float32)
      out, lse = kernel_ffi.fwd(
        q,
        k,
        v,
        softmax_scale=1 / math.sqrt(d),
        window=window,
        diagonal_offset=sk - sq,
        descale_q=dq,
        descale_k=dk,
        descale_v=dv,
      )
      bad = bool(np.isnan(np.asarray(out, np.float32)).any() or np.isnan(np.asarray(lse)).any())
      print(f"d{d} q{sq} k{sk} window {window}: {'NaN' if bad else 'ok'}")
      failures += bad
    x = jnp.asarray(rng.standard_normal((2, 777, 4, d)), jnp.bfloat16)
    out = jax_fa3.fp8_attention(x, x, x, causal=True)
    bad = bool(np.isnan(np.asarray(out, np.float32)).any())
    print(f"d{d} fp8_attention: {'NaN' if bad else 'ok'}")
    failures += bad
  failures += quantizer_cases(rng)
  print("done" if not failures else f"{failures} calls with NaN")
  return 1 if failures else 0


def quantizer_cases(rng):
  from jax_fa3.fp8_quantize import quantize_fp8, random_signs  # pylint: disable=import-outside-toplevel

  failures = 0
  for d in (64, 128, 256):
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
      x = jnp.asarray(rng.standard_normal((2, 601, 3, d)), dtype)
      for block_rows, signs in (
        (64, random_signs(d)),
        (224, random_signs(d)),
        (257, None),
        (None, None),
      ):
        x8, descale = quantize_fp8(x, block_rows=block_rows, signs=signs)
        bad = bool(
          np.isnan(np.asarray(x8, np.float32)).any() or np.isnan(np.asarray(descale)).any()
        )
        print(
          f"quantize_fp8 d{d} {jnp.dtype(dtype).name} block_rows={block_rows}: {'NaN' if bad else 'ok'}"
        )
        failures += bad
  return failures


if __name__ == "__main__":
  sys.exit(main())
