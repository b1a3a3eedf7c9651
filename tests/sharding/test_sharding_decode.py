"""flash_attention_with_kvcache on sharded arrays: a contiguous cache stays split over the
batch and the heads, a paged one over the heads (its pool is never split by sequence)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa3


def decode(q, k_cache, v_cache, lengths, k_new, v_new, page_table=None, **kwargs):
  (out, lse), k_cache, v_cache = jax_fa3.flash_attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    lengths,
    k_new=k_new,
    v_new=v_new,
    page_table=page_table,
    return_lse=True,
    **kwargs,
  )
  return dict(out=out, lse=lse, k_cache=k_cache, v_cache=v_cache)


def contiguous(normal, batch=4, heads=8, kv_heads=4, seqlen_q=2, max_seqlen=32, head_dim=16):
  q = normal((batch, seqlen_q, heads, head_dim))
  caches = [normal((batch, max_seqlen, kv_heads, head_dim)) for _ in range(2)]
  new = [normal((batch, seqlen_q, kv_heads, head_dim)) for _ in range(2)]
  lengths = jnp.array([0, 7, 30, 19][:batch], jnp.int32)
  return [q, *caches, lengths, *new]


def paged(normal, page_size=8, **kwargs):
  """The contiguous case's arrays with the caches as randomly ordered pages (+2 spare)."""
  q, k_cache, v_cache, lengths, k_new, v_new = contiguous(normal, **kwargs)
  batch, max_seqlen = k_cache.shape[:2]
  per_sequence = max_seqlen // page_size
  order = np.random.default_rng(0).permutation(batch * per_sequence + 2)
  table = order[: batch * per_sequence].reshape(batch, per_sequence).astype(np.int32)
  pools = []
  for cache in (k_cache, v_cache):
    pool = np.zeros((len(order), page_size) + cache.shape[2:], np.float32)
    pool[table] = np.asarray(cache, np.float32).reshape(
      batch, per_sequence, page_size, *cache.shape[2:]
    )
    pools.append(jnp.asarray(pool, cache.dtype))
  return [q, *pools, lengths, k_new, v_new, jnp.asarray(table)]


def assert_sharded_as(results, mesh, specs):
  for name, spec in specs.items():
    x = results[name]
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (name, x.sharding)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(
  "spec",
  [P("data"), P(None, None, "model"), P("data", None, "model")],
  ids=["batch", "heads", "batch+heads"],
)
def test_contiguous_batch_and_heads_run_locally(
  spec, explicit, normal, compare, make_mesh, collectives
):
  """GQA 2:1, heads over 4 devices, batch over 2, appending 2 tokens: no collective; the
  results and the updated caches keep their inputs' shardings."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  arrays = contiguous(normal)
  lengths = P(spec[0])
  actual, hlo = compare(decode, arrays, [spec, spec, spec, lengths, spec, spec], mesh)
  assert collectives(hlo) == set()
  lse = P(spec[0], spec[2] if len(spec) > 2 else None, None)
  assert_sharded_as(actual, mesh, dict(out=spec, k_cache=spec, v_cache=spec, lse=lse))
  # The new keys landed in the cache at each sequence's length.
  np.testing.assert_array_equal(np.asarray(actual["k_cache"])[2, 30:32], np.asarray(arrays[4][2]))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_paged_heads_run_locally(explicit, normal, compare, make_mesh, collectives):
  """A paged pool split over its k/v heads, the page table and lengths replicated."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  heads = P(None, None, "model")
  arrays = paged(normal)
  actual, hlo = compare(
    functools.partial(decode, window_size=(9, 0)),
    arrays,
    [heads, heads, heads, P(), heads, heads, P()],
    mesh,
  )
  assert collectives(hlo) == set()
  assert_sharded_as(
    actual, mesh, dict(out=heads, k_cache=heads, v_cache=heads, lse=P(None, "model", None))
  )


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_paged_batch_split_is_gathered(explicit, normal, compare, make_mesh, collectives):
  """q split over the batch with a paged cache: the pool cannot follow, so q (and the new
  keys, lengths and page table) are gathered over the batch axis and every device of it
  writes the same rows into its copy of the pool; the results match one device's."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  both, heads = P("data", None, "model"), P(None, None, "model")
  arrays = paged(normal)
  actual, hlo = compare(
    decode, arrays, [both, heads, heads, P("data"), both, both, P("data")], mesh
  )
  assert "all-gather" in collectives(hlo)
  assert actual["k_cache"].sharding.is_equivalent_to(NamedSharding(mesh, heads), 4)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_heads_the_kv_heads_cannot_follow_are_gathered(
  explicit, normal, compare, make_mesh, collectives
):
  """8 query heads over 4 devices but 2 k/v heads (replicated): the heads are gathered, the
  batch stays split."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  q_spec, cache_spec = P("data", None, "model"), P("data")
  arrays = contiguous(normal, kv_heads=2)
  actual, hlo = compare(
    decode, arrays, [q_spec, cache_spec, cache_spec, P("data"), cache_spec, cache_spec], mesh
  )
  assert "all-gather" in collectives(hlo)
  assert actual["k_cache"].sharding.is_equivalent_to(NamedSharding(mesh, cache_spec), 4)


def test_inside_shard_map_runs_on_the_local_shards(normal, make_mesh):
  mesh = make_mesh((8,), ("model",))
  arrays = contiguous(normal, heads=16, kv_heads=8)
  heads = P(None, None, "model")
  specs = (heads, heads, heads, P(), heads, heads)
  mapped = jax.jit(
    jax.shard_map(
      lambda *a: tuple(decode(*a).values()),
      mesh=mesh,
      in_specs=specs,
      out_specs=(heads, P(None, "model"), heads, heads),
    )
  )
  actual = mapped(*arrays)
  with jax.default_device(jax.devices("cpu")[0]):
    expected = jax.jit(decode)(*arrays)
  expected = [expected[name] for name in ("out", "lse", "k_cache", "v_cache")]
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2**-7, atol=1e-6
    )
