"""A short decode loop for test_decode_cuda_graph.py, run as a script in a subprocess (XLA
reads its command-buffer flags once per process, from XLA_FLAGS).

    python cuda_graph_decode_steps.py OUT.npz

Each step appends one token to a paged cache through a jitted, cache-donating
`flash_attention_with_kvcache`, with fresh queries and ragged, growing lengths: the same
executable runs again on new data and, with donation, on cache buffers at changing
addresses. Saves every step's inputs and results, and the caches before and after.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa3

STEPS = 6
BATCH, HEADS, KV_HEADS, HEAD_DIM = 3, 16, 4, 128
PAGE_SIZE, PAGES_PER_SEQUENCE = 16, 8  # capacity 128 positions a sequence


def main(path):
  rng = np.random.default_rng(2026)
  # Drawn in float32 and rounded to bfloat16 here, so the saved values are the kernel's.
  normal = lambda *shape: np.asarray(
    jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16), np.float32
  )
  num_pages = BATCH * PAGES_PER_SEQUENCE + 3
  table = rng.permutation(num_pages)[: BATCH * PAGES_PER_SEQUENCE]
  table = table.reshape(BATCH, PAGES_PER_SEQUENCE).astype(np.int32)
  k_cache0 = normal(num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
  v_cache0 = normal(num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
  start = np.array([0, 37, 120], np.int32)  # empty, ragged, nearly full (120 + 6 < 128)

  step = jax.jit(
    lambda q, k_cache, v_cache, lengths, k_new, v_new, table: jax_fa3.flash_attention_with_kvcache(
      q,
      k_cache,
      v_cache,
      lengths,
      k_new=k_new,
      v_new=v_new,
      page_table=table,
      return_lse=True,
    ),
    donate_argnums=(1, 2),
  )
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  k_cache = jnp.asarray(k_cache0, jnp.bfloat16)
  v_cache = jnp.asarray(v_cache0, jnp.bfloat16)
  record = {"table": table, "k_cache0": k_cache0, "v_cache0": v_cache0}
  for i in range(STEPS):
    q = normal(BATCH, 1, HEADS, HEAD_DIM)
    k_new, v_new = normal(BATCH, 1, KV_HEADS, HEAD_DIM), normal(BATCH, 1, KV_HEADS, HEAD_DIM)
    lengths = start + i
    (out, lse), k_cache, v_cache = step(
      bf16(q), k_cache, v_cache, jnp.asarray(lengths), bf16(k_new), bf16(v_new), table
    )
    record.update(
      {
        f"q{i}": q,
        f"k_new{i}": k_new,
        f"v_new{i}": v_new,
        f"lengths{i}": lengths,
        f"out{i}": np.asarray(out, np.float32),
        f"lse{i}": np.asarray(lse),
      }
    )
  record["k_cache"] = np.asarray(k_cache, np.float32)
  record["v_cache"] = np.asarray(v_cache, np.float32)
  np.savez(path, **record)


if __name__ == "__main__":
  main(sys.argv[1])
