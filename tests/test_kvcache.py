"""flash_attention_with_kvcache on the reference path: results, cache updates, bad input.

The float64 oracle (oracle.kvcache) is written from the definitions; the GPU kernel is held
to the same cases in tests/gpu/test_decode_kernel.py.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
import oracle
from jax_fa3 import _kernels, primitives
from jax_fa3._kernels import KernelStatus, Variant

pytestmark = pytest.mark.usefixtures("on_cpu")


def _decode_inputs(
  normal,
  batch=3,
  seqlen_q=1,
  heads=8,
  kv_heads=2,
  head_dim=64,
  max_seqlen=48,
  seqlen_new=1,
  dtype=jnp.bfloat16,
):
  q = normal((batch, seqlen_q, heads, head_dim), dtype)
  k_cache = normal((batch, max_seqlen, kv_heads, head_dim), dtype)
  v_cache = normal((batch, max_seqlen, kv_heads, head_dim), dtype)
  new = (
    (
      normal((batch, seqlen_new, kv_heads, head_dim), dtype),
      normal((batch, seqlen_new, kv_heads, head_dim), dtype),
    )
    if seqlen_new
    else (None, None)
  )
  return q, k_cache, v_cache, new


def paged(k_cache, page_size, rng, spare_pages=3):
  """The contiguous cache scattered over randomly ordered pages: (pages, page_table)."""
  batch, max_seqlen = k_cache.shape[:2]
  per_sequence = max_seqlen // page_size
  order = rng.permutation(batch * per_sequence + spare_pages)
  table = order[: batch * per_sequence].reshape(batch, per_sequence).astype(np.int32)
  pages = np.zeros((len(order), page_size) + k_cache.shape[2:], np.float32)
  blocks = np.asarray(k_cache, np.float32).reshape(
    batch, per_sequence, page_size, *k_cache.shape[2:]
  )
  pages[table] = blocks
  return jnp.asarray(pages, k_cache.dtype), jnp.asarray(table)


def unpage(pages, table):
  """The paged cache gathered back into [batch, max_seqlen, ...]."""
  gathered = np.asarray(pages)[np.asarray(table)]
  return gathered.reshape(table.shape[0], -1, *pages.shape[2:])


def _close(actual, expected, dtype=jnp.bfloat16):
  tolerance = 2e-2 if dtype == jnp.bfloat16 else 4e-3
  np.testing.assert_allclose(
    np.asarray(actual, np.float32), expected, atol=tolerance, rtol=tolerance
  )


@pytest.mark.parametrize(
  "seqlen_q,seqlen_new,window,softcap",
  [
    (1, 1, (-1, -1), 0.0),
    (1, 0, (-1, -1), 0.0),
    (3, 3, (-1, -1), 0.0),
    (2, 5, (7, -1), 0.0),
    (1, 1, (-1, -1), 5.0),
    (4, 1, (-1, -1), 0.0),
  ],
)
def test_contiguous_matches_the_oracle(normal, seqlen_q, seqlen_new, window, softcap):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(
    normal, seqlen_q=seqlen_q, seqlen_new=seqlen_new
  )
  lengths = jnp.array([0, 17, 48 - seqlen_new], jnp.int32)
  (out, lse), k_out, v_out = jax_fa3.flash_attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    lengths,
    k_new=k_new,
    v_new=v_new,
    window_size=window,
    softcap=softcap,
    return_lse=True,
  )
  want = oracle.kvcache(
    q,
    k_cache,
    v_cache,
    lengths,
    k_new,
    v_new,
    scale=64**-0.5,
    softcap=softcap,
    window=(window[0], 0),
  )
  _close(out, want[0])
  np.testing.assert_allclose(lse, want[1], atol=1e-3, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])
  np.testing.assert_array_equal(np.asarray(v_out, np.float64), want[3])


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_equals_contiguous(normal, page_size):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal, seqlen_new=2, seqlen_q=2)
  rng = np.random.default_rng(page_size)
  k_pages, table = paged(k_cache, page_size, rng)
  v_pages, _ = paged(v_cache, page_size, np.random.default_rng(page_size))
  lengths = jnp.array([5, 0, 46], jnp.int32)
  out, k_out, v_out = jax_fa3.flash_attention_with_kvcache(
    q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new
  )
  out_p, k_out_p, v_out_p = jax_fa3.flash_attention_with_kvcache(
    q, k_pages, v_pages, lengths, k_new=k_new, v_new=v_new, page_table=table
  )
  np.testing.assert_array_equal(np.asarray(out_p, np.float32), np.asarray(out, np.float32))
  np.testing.assert_array_equal(unpage(k_out_p, table), np.asarray(k_out))
  np.testing.assert_array_equal(unpage(v_out_p, table), np.asarray(v_out))
  # The spare pages, which no table entry names, are untouched.
  spare = np.setdiff1d(np.arange(k_pages.shape[0]), np.asarray(table))
  np.testing.assert_array_equal(np.asarray(k_out_p)[spare], np.asarray(k_pages)[spare])


def test_paged_matches_the_oracle_with_gqa_8(normal):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(
    normal, heads=16, kv_heads=2, seqlen_new=3, head_dim=128
  )
  k_pages, table = paged(k_cache, 16, np.random.default_rng(0))
  v_pages, _ = paged(v_cache, 16, np.random.default_rng(0))
  lengths = jnp.array([1, 30, 45], jnp.int32)
  out, k_out, _ = jax_fa3.flash_attention_with_kvcache(
    q, k_pages, v_pages, lengths, k_new=k_new, v_new=v_new, page_table=table
  )
  want = oracle.kvcache(q, k_pages, v_pages, lengths, k_new, v_new, table, scale=128**-0.5)
  _close(out, want[0])
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])


def test_traced_lengths_under_jit(normal):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal)
  traces = []

  @jax.jit
  def step(lengths):
    traces.append(None)
    return jax_fa3.flash_attention_with_kvcache(
      q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new
    )

  for lengths in ([3, 4, 5], [40, 0, 12]):
    lengths = jnp.array(lengths, jnp.int32)
    out, k_out, _ = step(lengths)
    want = oracle.kvcache(q, k_cache, v_cache, lengths, k_new, v_new, scale=64**-0.5)
    _close(out, want[0])
    np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])
  assert len(traces) == 1


def test_donated_caches_under_jit(normal):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal)
  step = jax.jit(
    functools.partial(jax_fa3.flash_attention_with_kvcache, k_new=k_new, v_new=v_new),
    donate_argnums=(1, 2),
  )
  want = oracle.kvcache(q, k_cache, v_cache, np.array([1, 2, 3]), k_new, v_new, scale=64**-0.5)
  _, k_out, v_out = step(q, k_cache, v_cache, jnp.array([1, 2, 3], jnp.int32))
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])
  np.testing.assert_array_equal(np.asarray(v_out, np.float64), want[3])


@pytest.mark.parametrize("bad_length", [-1, 48, 2**31 - 1])
def test_out_of_range_length_gives_nan_and_writes_nothing(normal, bad_length):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal)
  lengths = jnp.array([4, bad_length, 47], jnp.int32)
  out, k_out, v_out = jax_fa3.flash_attention_with_kvcache(
    q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new
  )
  assert np.isnan(np.asarray(out[1], np.float32)).all()
  assert not np.isnan(np.asarray(out[::2], np.float32)).any()
  np.testing.assert_array_equal(np.asarray(k_out[1]), np.asarray(k_cache[1]))
  np.testing.assert_array_equal(np.asarray(v_out[1]), np.asarray(v_cache[1]))
  want = oracle.kvcache(q, k_cache, v_cache, lengths, k_new, v_new, scale=64**-0.5)
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])


def test_out_of_range_page_gives_nan_and_touches_no_other_sequence(normal):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal)
  k_pages, table = paged(k_cache, 8, np.random.default_rng(1))
  v_pages, _ = paged(v_cache, 8, np.random.default_rng(1))
  table = table.at[0, 0].set(10_000).at[2, 5].set(-3)  # sequence 2 writes into its page 5
  lengths = jnp.array([3, 9, 40], jnp.int32)
  out, k_out, v_out = jax_fa3.flash_attention_with_kvcache(
    q, k_pages, v_pages, lengths, k_new=k_new, v_new=v_new, page_table=table
  )
  out = np.asarray(out, np.float32)
  assert np.isnan(out[0]).all() and np.isnan(out[2]).all() and not np.isnan(out[1]).any()
  want = oracle.kvcache(q, k_pages, v_pages, lengths, k_new, v_new, table, scale=64**-0.5)
  np.testing.assert_array_equal(np.asarray(k_out, np.float64), want[2])
  np.testing.assert_array_equal(np.asarray(v_out, np.float64), want[3])
  # Only sequence 1's new row and sequence 0's (its page 0 is bad, its row 3 is on page 0:
  # not written) changed: every page but sequence 1's page 1 is as it was.
  changed = np.flatnonzero((np.asarray(k_out) != np.asarray(k_pages)).any(axis=(1, 2, 3)))
  np.testing.assert_array_equal(changed, [int(table[1, 1])])


def test_float16_and_head_dim_80(normal):
  q, k_cache, v_cache, (k_new, v_new) = _decode_inputs(normal, head_dim=80, dtype=jnp.float16)
  lengths = jnp.array([7, 8, 9], jnp.int32)
  out, _, _ = jax_fa3.flash_attention_with_kvcache(
    q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new, softmax_scale=0.3
  )
  want = oracle.kvcache(q, k_cache, v_cache, lengths, k_new, v_new, scale=0.3)
  assert out.dtype == jnp.float16
  _close(out, want[0], jnp.float16)


def test_no_gradient(normal):
  q, k_cache, v_cache, _ = _decode_inputs(normal, seqlen_new=0)
  lengths = jnp.array([1, 2, 3], jnp.int32)
  loss = lambda q: jnp.sum(
    jax_fa3.flash_attention_with_kvcache(q, k_cache, v_cache, lengths)[0].astype(jnp.float32)
  )
  with pytest.raises(NotImplementedError, match="no gradient"):
    jax.grad(loss)(q)


@pytest.mark.parametrize(
  "change,error,match",
  [
    (dict(q=jnp.zeros((3, 1, 8, 64), jnp.float32)), TypeError, "q has dtype float32"),
    (
      dict(k_cache=jnp.zeros((3, 48, 2, 64), jnp.float16)),
      TypeError,
      "k_cache must have q's dtype",
    ),
    (
      dict(v_cache=jnp.zeros((3, 40, 2, 64), jnp.bfloat16)),
      ValueError,
      "v_cache must have k_cache's shape",
    ),
    (
      dict(
        k_cache=jnp.zeros((3, 48, 3, 64), jnp.bfloat16),
        v_cache=jnp.zeros((3, 48, 3, 64), jnp.bfloat16),
      ),
      ValueError,
      "divides q's",
    ),
    (
      dict(cache_seqlens=jnp.zeros((3,), jnp.int64 if jax.config.x64_enabled else jnp.uint32)),
      ValueError,
      "cache_seqlens must be int32",
    ),
    (dict(cache_seqlens=jnp.zeros((2,), jnp.int32)), ValueError, "cache_seqlens must be int32"),
    (dict(page_table=jnp.zeros((3, 4), jnp.float32)), ValueError, "page_table must be int32"),
    (dict(page_table=jnp.zeros((2, 4), jnp.int32)), ValueError, "page_table must be int32"),
    (dict(k_new=jnp.zeros((3, 1, 2, 64), jnp.bfloat16)), ValueError, "both k_new and v_new"),
    (
      dict(
        k_new=jnp.zeros((3, 1, 4, 64), jnp.bfloat16), v_new=jnp.zeros((3, 1, 4, 64), jnp.bfloat16)
      ),
      ValueError,
      "k_new must be",
    ),
    (dict(num_splits=200), ValueError, "num_splits"),
    (dict(num_splits=1.5), ValueError, "num_splits"),
    (dict(causal="yes"), TypeError, "causal"),
    (
      dict(
        k_cache=jnp.zeros((2, 48, 2, 64), jnp.bfloat16),
        v_cache=jnp.zeros((2, 48, 2, 64), jnp.bfloat16),
      ),
      ValueError,
      "without page_table",
    ),
  ],
)
def test_bad_arguments_are_named(change, error, match):
  args = dict(
    q=jnp.zeros((3, 1, 8, 64), jnp.bfloat16),
    k_cache=jnp.zeros((3, 48, 2, 64), jnp.bfloat16),
    v_cache=jnp.zeros((3, 48, 2, 64), jnp.bfloat16),
    cache_seqlens=jnp.zeros((3,), jnp.int32),
  )
  args.update(change)
  with pytest.raises(error, match=match):
    jax_fa3.flash_attention_with_kvcache(**args)


def test_cuda_lowering_aliases_the_caches(monkeypatch):
  variants = (
    Variant("decode", "bfloat16", "bfloat16", 64, 64),
    Variant("decode", "bfloat16", "bfloat16", 128, 128),
  )
  monkeypatch.setattr(
    _kernels,
    "_status",
    KernelStatus(variants, decode_shapes={("bfloat16", 64): (64, 2), ("bfloat16", 128): (64, 2)}),
  )
  q = jnp.zeros((1, 1, 8, 96), jnp.bfloat16)
  cache = jnp.zeros((1, 4096, 2, 96), jnp.bfloat16)
  fn = lambda q, k, v, lengths: jax_fa3.flash_attention_with_kvcache(
    q, k, v, lengths, k_new=k[:, :1], v_new=v[:, :1], window_size=(100, -1)
  )
  text = (
    jax.jit(fn)
    .trace(q, cache, cache, jnp.zeros((1,), jnp.int32))
    .lower(lowering_platforms=("cuda",))
    .as_text()
  )
  (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @jax_fa3_decode(" in line]
  assert "output_operand_aliases" in call
  assert "window_left = 100 : i64" in call and "window_right = 0 : i64" in call
  # batch 1 x 2 KV heads = 2 CTAs per split: the heuristic splits 4096 keys into many parts.
  assert "num_splits = 1 : i64" not in call


def test_split_heuristic_fills_the_gpu():
  split = functools.partial(primitives.decode_num_splits, block_n=64, ctas_per_sm=2, num_sms=132)
  # Long splits: about one CTA on each of the 132 SMs.
  assert 120 <= 8 * split(1, 8, 1, 32768) <= 132
  assert 120 <= 64 * split(8, 8, 1, 8192) <= 132
  # Splits shorter than DECODE_LONG_SPLIT_KEYS at one an SM: about two CTAs an SM (264 slots).
  assert 250 <= 8 * split(1, 8, 1, 8192) <= 264
  assert split(64, 8, 1, 32768) == 1  # 512 CTAs already
  assert split(1, 8, 1, 256) == 1  # too few keys to share out
  assert split(1, 8, 1, 2048) == 16  # two 64-key tiles per split
  # A paged cache keeps two CTAs an SM.
  assert 250 <= 8 * split(1, 8, 1, 32768, paged=True) <= 264
  # One CTA an SM at most (head dim 256): short splits fill the 132 slots too.
  assert 120 <= 8 * split(1, 8, 1, 8192, ctas_per_sm=1) <= 132


# --- vmap --------------------------------------------------------------------------------


def _one_by_one(fn, n, args, axes):
  """fn applied to each mapped instance in turn, the results stacked: what vmap must equal."""
  results = [
    fn(*[x if a is None else jnp.take(x, i, axis=a) for x, a in zip(args, axes)]) for i in range(n)
  ]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float32) for x in xs]), *results)


def _assert_same(actual, expected):
  """Equal up to one bfloat16 rounding (jit may fuse the reference differently); NaN where
  NaN is expected."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=2**-7, atol=1e-6)


def test_vmap_contiguous_with_some_operands_unmapped(normal):
  """q and the new keys mapped (axis 1 for q), the cache and lengths shared."""
  n = 3
  q, k_cache, v_cache, _ = _decode_inputs(normal, batch=2, seqlen_q=2)
  qs = jnp.stack([q * (i + 1) for i in range(n)], axis=1)
  k_new, v_new = normal((n, 2, 2, 2, 64)), normal((n, 2, 2, 2, 64))
  lengths = jnp.array([5, 30], jnp.int32)

  def fn(q, k_new, v_new, k_cache, lengths):
    return jax_fa3.flash_attention_with_kvcache(
      q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new, return_lse=True
    )

  args, axes = (qs, k_new, v_new, k_cache, lengths), (1, 0, 0, None, None)
  mapped = jax.jit(jax.vmap(fn, in_axes=axes))(*args)
  _assert_same(mapped, _one_by_one(fn, n, args, axes))
  (_, lse), k_out, _ = mapped
  assert lse.shape == (n, 2, 8, 2) and k_out.shape == (n,) + k_cache.shape
  # Each instance wrote its own keys into its own copy of the cache.
  np.testing.assert_array_equal(np.asarray(k_out[2, 1, 30:32]), np.asarray(k_new[2, 1]))


def test_vmap_paged_with_a_pool_per_instance(normal):
  """Pools mapped, page table shared, one of its entries out of range for one sequence."""
  n, rng = 2, np.random.default_rng(0)
  q, k_cache, v_cache, _ = _decode_inputs(normal, batch=3)
  pools = [paged(k_cache, 16, rng)]
  k_pages, table = pools[0]
  v_np = np.zeros(k_pages.shape, np.float32)  # v scattered with k's page table
  v_np[np.asarray(table)] = np.asarray(v_cache, np.float32).reshape(3, 3, 16, 2, 64)
  v_pages = jnp.asarray(v_np, v_cache.dtype)
  table = table.at[2, 1].set(k_pages.shape[0])  # sequence 2's second page is out of range
  k_pools = jnp.stack([k_pages, -k_pages])
  v_pools = jnp.stack([v_pages, 2 * v_pages])
  k_new, v_new = normal((n, 3, 1, 2, 64)), normal((n, 3, 1, 2, 64))
  lengths = jnp.array([3, 15, 20], jnp.int32)

  def fn(q, k_pages, v_pages, k_new, v_new):
    return jax_fa3.flash_attention_with_kvcache(
      q, k_pages, v_pages, lengths, k_new=k_new, v_new=v_new, page_table=table
    )

  args, axes = (q, k_pools, v_pools, k_new, v_new), (None, 0, 0, 0, 0)
  mapped = jax.vmap(fn, in_axes=axes)(*args)
  _assert_same(mapped, _one_by_one(fn, n, args, axes))
  out = np.asarray(mapped[0], np.float32)
  assert np.isnan(out[:, 2]).all() and not np.isnan(out[:, :2]).any()


def test_vmap_paged_shared_pool_reads_and_refuses_writes(normal):
  n, rng = 3, np.random.default_rng(1)
  q, k_cache, v_cache, _ = _decode_inputs(normal, batch=2)
  k_pages, table = paged(k_cache, 16, rng)
  v_pages = k_pages[::-1]
  tables = jnp.stack([jnp.roll(table, i, axis=1) for i in range(n)])
  lengths = jnp.array([40, 17], jnp.int32)
  qs = normal((n,) + q.shape)

  def fn(q, table, k_new=None, v_new=None):
    return jax_fa3.flash_attention_with_kvcache(
      q, k_pages, v_pages, lengths, k_new=k_new, v_new=v_new, page_table=table
    )

  args, axes = (qs, tables), (0, 0)
  mapped = jax.vmap(fn)(*args)
  _assert_same(mapped, _one_by_one(fn, n, args, axes))
  k_new = normal((n, 2, 1, 2, 64))
  with pytest.raises(NotImplementedError, match="shared by the mapped instances.*k_new"):
    jax.vmap(fn)(qs, tables, k_new, k_new)


# --- Sinks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("paged_cache", [False, True], ids=["contiguous", "paged"])
def test_sinks_match_the_oracle(normal, paged_cache):
  """Sinks join each row's softmax: against the float64 oracle's attention_with_sinks, with a
  sequence that sees no key (length 0, nothing appended: out 0, lse = sink), a large sink
  that takes most of the weight, and a bad length (NaN stays NaN)."""
  q, k_cache, v_cache, _ = _decode_inputs(normal, batch=4, seqlen_q=2, seqlen_new=0)
  sinks = jnp.array([0.0, 3.0, -2.0, 8.0, 1.0, 0.5, -1.0, 2.0], jnp.float32)
  lengths = jnp.array([0, 17, 48, 49], jnp.int32)
  table = None
  if paged_cache:
    rng = np.random.default_rng(2)
    k_pages, table = paged(k_cache, 16, rng)
    v_np = np.zeros(k_pages.shape, np.float32)
    v_np[np.asarray(table)] = np.asarray(v_cache, np.float32).reshape(4, 3, 16, 2, 64)
    k_cache, v_cache = k_pages, jnp.asarray(v_np, v_cache.dtype)
  (out, lse), _, _ = jax_fa3.flash_attention_with_kvcache(
    q, k_cache, v_cache, lengths, page_table=table, sinks=sinks, return_lse=True
  )
  want_out, want_lse, *_ = oracle.kvcache(
    q, k_cache, v_cache, lengths, page_table=table, scale=64**-0.5, window=(-1, 0), sinks=sinks
  )
  assert np.isnan(want_lse[3]).all() and (want_lse[0] == np.asarray(sinks)[:, None]).all()
  _close(out, want_out)
  np.testing.assert_allclose(lse, want_lse, atol=1e-3, rtol=1e-4)
  # The sinks changed something: without them the outputs differ.
  plain, _, _ = jax_fa3.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, page_table=table)
  assert np.abs(np.asarray(plain, np.float32)[1:3] - want_out[1:3]).max() > 0.1


def test_sinks_are_checked(normal):
  q, k_cache, v_cache, _ = _decode_inputs(normal, seqlen_new=0)
  with pytest.raises(
    ValueError, match="sinks must be a float array of shape \\[heads\\] = \\[8\\]"
  ):
    jax_fa3.flash_attention_with_kvcache(
      q, k_cache, v_cache, jnp.zeros(3, jnp.int32), sinks=jnp.zeros(2)
    )


# --- the decode benchmark ------------------------------------------------------------------


def test_decode_benchmark_runs_at_a_tiny_size(tmp_path, monkeypatch):
  """benchmarks/decode.py end to end at its smallest size, on whatever path this machine has:
  the threaded calls (decode.attend_threaded) run and every cell gets a positive bandwidth."""
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
  import decode

  decode.main(
    ["--impls", "jax_fa3", "--batches", "1", "--seqlens", "64", "--page-sizes", "0", "16"]
    + ["--head-dims", "128", "--iterations", "1", "--out", str(tmp_path)]
  )
  records = json.loads((tmp_path / "decode.json").read_text())
  assert sorted(r["page_size"] for r in records) == [0, 16]
  assert all(r["impl"] == "jax_fa3" and r["gbps"] > 0 for r in records)
  assert "| 128 | 1 | 64 |" in (tmp_path / "decode.md").read_text()
