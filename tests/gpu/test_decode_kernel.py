"""The decode kernel (jax_fa3_decode) against the float64 oracle: outputs, lse and the
returned caches entry by entry, over contiguous and paged caches, ragged lengths, appends,
GQA, windows, softcap, split counts, and out-of-range lengths and pages."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
import oracle


def _inputs(
  rng, batch, seqlen_q, heads, kv_heads, head_dim, capacity, seqlen_new, dtype, page_size=0
):
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  q = normal(batch, seqlen_q, heads, head_dim)
  new = (
    (normal(batch, seqlen_new, kv_heads, head_dim), normal(batch, seqlen_new, kv_heads, head_dim))
    if seqlen_new
    else (None, None)
  )
  if not page_size:
    return (
      q,
      normal(batch, capacity, kv_heads, head_dim),
      normal(batch, capacity, kv_heads, head_dim),
      new,
      None,
    )
  max_pages = capacity // page_size
  num_pages = batch * max_pages + 5
  table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages).astype(np.int32)
  return (
    q,
    normal(num_pages, page_size, kv_heads, head_dim),
    normal(num_pages, page_size, kv_heads, head_dim),
    new,
    jnp.asarray(table),
  )


def _logical(cache, table, batch):
  cache = np.asarray(cache, np.float32)
  return (
    cache[:batch]
    if table is None
    else cache[np.asarray(table)].reshape(batch, -1, *cache.shape[2:])
  )


def _baseline(q, k_cache, v_cache, table, lengths, seqlen_new, window, softcap, scale):
  """XLA attention in q's dtype on the updated caches: the accuracy yardstick."""
  batch, seqlen_q = q.shape[:2]
  keys = jnp.asarray(_logical(k_cache, table, batch), q.dtype)
  values = jnp.asarray(_logical(v_cache, table, batch), q.dtype)
  total = np.asarray(lengths) + seqlen_new
  cols = np.arange(keys.shape[1])[None, None]
  rows = (total[:, None] - seqlen_q + np.arange(seqlen_q))[..., None]
  visible = cols < total[:, None, None]
  if window[0] >= 0:
    visible = visible & (cols >= rows - window[0])  # [B, 1, S] & [B, Sq, 1]: not in place
  if window[1] >= 0:
    visible = visible & (cols <= rows + window[1])
  heads, kv_heads = q.shape[2], keys.shape[2]
  qf, kf, vf = (jnp.asarray(x, q.dtype) for x in (q, keys, values))
  scores = jnp.einsum("bqhd,bkhd->bhqk", qf, jnp.repeat(kf, heads // kv_heads, axis=2)) * scale
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(visible[:, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  return np.asarray(
    jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.repeat(vf, heads // kv_heads, axis=2)), np.float32
  )


def _run(q, k_cache, v_cache, lengths, new, table, **kwargs):
  fn = jax.jit(
    lambda q, k, v, lengths, k_new, v_new, table: jax_fa3.flash_attention_with_kvcache(
      q, k, v, lengths, k_new=k_new, v_new=v_new, page_table=table, return_lse=True, **kwargs
    )
  )
  args = (q, k_cache, v_cache, lengths, *new, table)
  assert "jax_fa3_decode" in fn.lower(*args).as_text()
  (out, lse), k_out, v_out = fn(*args)
  return np.asarray(out, np.float32), np.asarray(lse), k_out, v_out


CASES = [  # batch, seqlen_q, heads, kv_heads, head_dim, capacity, seqlen_new, page_size, window, softcap, splits
  (3, 1, 8, 2, 128, 512, 1, 0, (-1, -1), 0.0, 0),
  (3, 1, 8, 2, 128, 512, 0, 16, (-1, -1), 0.0, 0),
  (4, 1, 32, 4, 128, 1024, 1, 64, (-1, -1), 0.0, 0),  # GQA 8:1
  (2, 1, 4, 4, 64, 768, 3, 256, (-1, -1), 0.0, 5),  # MHA, several new tokens
  (2, 4, 16, 2, 128, 512, 4, 16, (-1, -1), 0.0, 3),  # speculative: 32 rows, 2 m-blocks
  (2, 2, 8, 2, 256, 512, 2, 0, (-1, -1), 0.0, 2),
  (3, 1, 8, 1, 64, 1000, 1, 0, (100, -1), 0.0, 4),  # window, MQA
  (2, 3, 8, 2, 128, 640, 3, 32, (-1, -1), 30.0, 0),  # softcap
  (2, 1, 8, 2, 96, 256, 1, 0, (-1, -1), 0.0, 1),  # head_dim 96 runs on the 128 kernel
  (1, 1, 32, 8, 128, 32768, 1, 0, (-1, -1), 0.0, 0),  # many splits
  (2, 1, 32, 8, 128, 4096, 1, 48, (-1, -1), 0.0, 0),  # a page size that is not a power of 2
  (2, 2, 16, 4, 64, 1024, 2, 16, (-1, -1), 20.0, 0),  # d64's 32-key stages over 16-row pages
  (2, 1, 8, 2, 48, 300, 1, 0, (-1, -1), 0.0, 0),  # head_dim 48 runs on the 64 kernel
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_the_oracle(case, dtype):
  batch, seqlen_q, heads, kv_heads, d, capacity, seqlen_new, page_size, window, softcap, splits = (
    case
  )
  rng = np.random.default_rng(zlib.crc32(repr((case, str(dtype))).encode()))
  q, k_cache, v_cache, new, table = _inputs(
    rng, batch, seqlen_q, heads, kv_heads, d, capacity, seqlen_new, dtype, page_size
  )
  usable = capacity // page_size * page_size if page_size else capacity  # whole pages only
  lengths = rng.integers(0, usable - seqlen_new + 1, batch).astype(np.int32)
  lengths[0] = usable - seqlen_new  # a full cache
  if batch > 2:
    lengths[1] = 0  # an empty one
  lengths = jnp.asarray(lengths)
  scale = d**-0.5
  want_out, want_lse, want_k, want_v = oracle.kvcache(
    q, k_cache, v_cache, lengths, *new, table, scale=scale, softcap=softcap, window=(window[0], 0)
  )
  out, lse, k_out, v_out = _run(
    q, k_cache, v_cache, lengths, new, table, softcap=softcap, window_size=window, num_splits=splits
  )
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want_k)
  np.testing.assert_array_equal(np.asarray(v_out, np.float64), want_v)
  seen = np.isfinite(want_lse)  # [B, H, Sq]: rows that see a key
  base = _baseline(q, want_k, want_v, table, lengths, seqlen_new, (window[0], 0), softcap, scale)
  seen_rows = np.swapaxes(seen, 1, 2)[..., None]
  err = np.max(np.abs(np.where(seen_rows, out - want_out, 0)))
  base_err = np.max(np.abs(np.where(seen_rows, base - want_out, 0)))
  assert err <= 2 * base_err + 1e-4, (err, base_err)
  assert not np.isnan(want_lse).any(), "every length and page of these cases is in range"
  assert (out[~np.broadcast_to(seen_rows, out.shape)] == 0).all()
  np.testing.assert_allclose(lse[seen], want_lse[seen], atol=2e-3, rtol=1e-4)
  assert (lse[~seen] == -np.inf).all()


def test_split_counts_agree():
  rng = np.random.default_rng(7)
  q, k_cache, v_cache, new, table = _inputs(rng, 2, 1, 32, 8, 128, 8192, 1, jnp.bfloat16, 64)
  lengths = jnp.array([8191, 3000], jnp.int32)
  results = [
    _run(q, k_cache, v_cache, lengths, new, table, num_splits=s)[:2] for s in (1, 7, 0, 128)
  ]
  for out, lse in results[1:]:
    np.testing.assert_allclose(out, results[0][0], atol=2e-2)
    np.testing.assert_allclose(lse, results[0][1], atol=1e-4)


@pytest.mark.parametrize("page_size", [0, 16])
def test_out_of_range_lengths_and_pages(page_size):
  rng = np.random.default_rng(3)
  batch, capacity = 5, 256
  q, k_cache, v_cache, new, table = _inputs(
    rng, batch, 1, 8, 2, 128, capacity, 2, jnp.bfloat16, page_size
  )
  lengths = jnp.array([10, -5, capacity - 1, 2**31 - 1, 100], jnp.int32)  # 1, 2 and 3 are bad
  if table is not None:
    table = table.at[4, 3].set(1 << 20)  # sequence 4 uses page 3 (positions 48..63): bad
    table = table.at[0, 10].set(-1)  # sequence 0 does not use page 10: harmless
  out, lse, k_out, v_out = _run(q, k_cache, v_cache, lengths, new, table, num_splits=3)
  want = oracle.kvcache(q, k_cache, v_cache, lengths, *new, table, scale=128**-0.5)
  nan_rows = np.isnan(want[0]).all(axis=(1, 2, 3))
  assert list(nan_rows) == [False, True, True, True, table is not None]
  assert np.isnan(out[nan_rows]).all() and np.isnan(lse[nan_rows]).all()
  assert not np.isnan(out[~nan_rows]).any()
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])
  np.testing.assert_array_equal(np.asarray(v_out, np.float64), want[3])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_query_rows_past_a_grid_dimension(num_splits):
  """A chunk of 65600 queries over 16 heads sharing one KV head: 65600 m-blocks of 16 rows,
  more than a grid's y or z dimension takes (65535); the split kernel and the combine fold
  them into x. Without a causal mask every row sees every key, so each m-block is checked."""
  rng = np.random.default_rng(11)
  q, k_cache, v_cache, new, table = _inputs(rng, 1, 65600, 16, 1, 64, 64, 4, jnp.bfloat16)
  lengths = jnp.array([40], jnp.int32)
  scale = 64**-0.5
  want_out, want_lse, want_k, want_v = oracle.kvcache(
    q, k_cache, v_cache, lengths, *new, table, scale=scale
  )
  out, lse, k_out, v_out = _run(
    q, k_cache, v_cache, lengths, new, table, causal=False, num_splits=num_splits
  )
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want_k)
  base = _baseline(q, want_k, want_v, table, lengths, 4, (-1, -1), 0.0, scale)
  assert not np.isnan(out).any(), "a row was not written"
  err, base_err = np.max(np.abs(out - want_out)), np.max(np.abs(base - want_out))
  assert err <= 2 * base_err + 1e-4, (err, base_err)
  np.testing.assert_allclose(lse, want_lse, atol=2e-3, rtol=1e-4)
