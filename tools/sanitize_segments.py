"""Packed-sequence calls for compute-sanitizer (memcheck, racecheck): segment ids with
padding and recurring ids, and varlen with malformed cu_seqlens, forward and backward,
through the public API (their tile plans are made in JAX). Exits non-zero on a NaN where
none belongs (outputs are poisoned before each launch)."""

import os
import sys

os.environ.setdefault("JAX_FA3_DEBUG_POISON", "1")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_fa3  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  bad = 0
  for head_dim, seqlen, causal, deterministic in ((128, 300, True, True),):
    ids = np.sort(rng.integers(0, 6, (2, seqlen)), axis=1).astype(np.int32)
    ids[0, -50:] = -1  # padding
    ids[1, ::9] = 2  # an id that recurs
    q, k, v = (
      jnp.asarray(rng.standard_normal((2, seqlen, h, head_dim), np.float32), jnp.bfloat16)
      for h in (4, 2, 2)
    )
    loss = lambda q, k, v: jnp.sum(
      jax_fa3.flash_attention(
        q, k, v, segment_ids=ids, causal=causal, deterministic=deterministic
      ).astype(jnp.float32)
    )
    for name, x in zip(("dq", "dk", "dv"), jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)):
      if np.isnan(np.asarray(x, np.float32)).any():
        print(f"NaN in {name}: d{head_dim} s{seqlen}")
        bad += 1
    print(f"done segments d{head_dim} s{seqlen}", flush=True)
  # Malformed cu_seqlens: NaN for those sequences only, and no access out of bounds.
  q = jnp.asarray(rng.standard_normal((400, 4, 128), np.float32), jnp.bfloat16)
  out = jax.jit(
    lambda q: jax_fa3.flash_attention_varlen(
      q,
      q[:300],
      q[:300],
      np.array([0, 100, 250, 200, 400], np.int32),
      np.array([0, 100, 200, 250, 900], np.int32),
      causal=True,
    )
  )(q)
  nan_rows = np.isnan(np.asarray(out, np.float32)).any(axis=(1, 2))
  if nan_rows[:200].any() or not nan_rows[200:].all():
    print("varlen: NaN rows not where the malformed sequences are")
    bad += 1
  print("done varlen", flush=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
