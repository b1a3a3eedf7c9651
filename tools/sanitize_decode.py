"""Decode calls with out-of-range lengths and page-table entries, for compute-sanitizer
memcheck: contiguous and paged caches, with and without splits. Exits non-zero when a bad
sequence's output is not NaN or a good one's is (outputs are poisoned before each launch)."""

import os
import sys

os.environ.setdefault("JAX_FA3_DEBUG_POISON", "1")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_fa3  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
  batch, capacity, page_size = 4, 512, 16
  lengths = jnp.array([100, -7, capacity, 2**31 - 1], jnp.int32)  # sequences 1-3 are bad
  q, k_new, v_new = normal(batch, 1, 8, 128), normal(batch, 1, 2, 128), normal(batch, 1, 2, 128)
  failures = 0
  for paged in (False, True):
    for splits in (1, 4):
      if paged:
        table = rng.permutation(batch * capacity // page_size).reshape(batch, -1).astype(np.int32)
        table[0, 2] = 1 << 24  # sequence 0 reads page 2: bad
        table[2, 0] = -5
        caches = [normal(batch * capacity // page_size, page_size, 2, 128) for _ in range(2)]
        expected_nan = [True, True, True, True]
      else:
        table = None
        caches = [normal(batch, capacity, 2, 128) for _ in range(2)]
        expected_nan = [False, True, True, True]
      out, _, _ = jax.jit(
        lambda q, k, v, lengths, table: jax_fa3.flash_attention_with_kvcache(
          q, k, v, lengths, k_new=k_new, v_new=v_new, page_table=table, num_splits=splits
        )
      )(q, *caches, lengths, None if table is None else jnp.asarray(table))
      nan = np.isnan(np.asarray(out, np.float32)).all(axis=(1, 2, 3))
      print(f"paged={paged} splits={splits}: NaN per sequence {list(nan)}")
      failures += list(nan) != expected_nan
  print("done", "FAILED" if failures else "ok")
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
