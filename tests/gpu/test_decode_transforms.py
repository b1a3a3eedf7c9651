"""flash_attention_with_kvcache through the decode kernel under transformations, on one GPU:
jax.vmap (contiguous caches, paged pools one per instance, a shared pool read by every
instance) and the sharding wrapper on a one-GPU mesh (batch and heads specs, Auto and
Explicit axes). Each mapped instance, or the whole sharded call, against the float64 oracle
with test_decode_kernel.py's tolerances, the returned caches entry by entry (decode_checks).
test_multi_gpu_decode.py runs the sharded calls over several GPUs."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from decode_checks import (
  assert_matches_the_oracle,
  assert_sharded_as,
  calls_the_kernel,
  decode,
  decode_inputs,
  instance,
  run_sharded,
)
from jax_fa3._kernels import DECODE_TARGET

BF16, FP16 = jnp.bfloat16, jnp.float16


def _rng(request):
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _stack(instances, axis=0):
  """The instances' operands stacked on `axis` (an absent operand stays None)."""
  return [None if xs[0] is None else jnp.stack(xs, axis) for xs in zip(*instances)]


def _mapped(fn, args, in_axes, out_axes=0):
  """jit(vmap(fn)) on args, after checking that it lowers to the decode kernel."""
  mapped = jax.jit(jax.vmap(fn, in_axes=in_axes, out_axes=out_axes))
  assert DECODE_TARGET in mapped.lower(*args).as_text()
  return mapped(*args)


# --- vmap --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_vmap_contiguous_caches_one_per_instance(dtype, num_splits, request):
  """Three instances, each with its own cache, lengths and appended tokens (q mapped on its
  axis 1), GQA 4:1, two query rows: folded into one batch of 9 sequences. One sequence of
  instance 1 has a bad length: NaN there, and nothing written to any cache for it."""
  rng, n = _rng(request), 3
  instances = [
    decode_inputs(
      rng, batch=3, heads=16, kv_heads=4, capacity=384, seqlen_q=2, seqlen_new=2, dtype=dtype
    )
    for _ in range(n)
  ]
  instances[1][3] = instances[1][3].at[1].set(-4)
  args = _stack(instances)
  args[0] = jnp.moveaxis(args[0], 0, 1)
  results = _mapped(
    functools.partial(decode, num_splits=num_splits), args, (1, 0, 0, 0, 0, 0, None)
  )
  assert results[2].shape == (n,) + instances[0][1].shape
  for i in range(n):
    bad = assert_matches_the_oracle(instances[i], instance(results, i, 0))
    assert list(bad) == [False, i == 1, False]


def test_nested_vmap_over_a_shared_cache(request):
  """vmap of vmap, the cache and lengths shared by all 2 x 3 instances, the new tokens by
  the outer ones: each instance writes its own tokens into its own copy of the cache."""
  rng = _rng(request)
  q, k_cache, v_cache, lengths, _, _, _ = decode_inputs(
    rng, batch=2, heads=8, kv_heads=2, capacity=256, seqlen_new=0
  )
  qs = jnp.asarray(rng.standard_normal((2, 3) + q.shape, np.float32), BF16)
  k_new, v_new = (
    jnp.asarray(rng.standard_normal((3, 2, 3, 2, 128), np.float32), BF16) for _ in range(2)
  )
  lengths = lengths.at[0].set(256 - 3)
  inner = jax.vmap(decode, in_axes=(0, None, None, None, 0, 0, None))
  args = (qs, k_cache, v_cache, lengths, k_new, v_new, None)
  results = _mapped(inner, args, (0, None, None, None, None, None, None))
  assert results[2].shape == (2, 3) + k_cache.shape
  for i in range(2):
    for j in range(3):
      arrays = [qs[i, j], k_cache, v_cache, lengths, k_new[j], v_new[j], None]
      bad = assert_matches_the_oracle(arrays, instance(instance(results, i, 0), j, 0))
      assert not bad.any()


@pytest.mark.parametrize("page_size", [16, 64])
def test_vmap_paged_pools_one_per_instance(page_size, request):
  """Two instances, each with its own pool (spare pages included), lengths and new tokens,
  sharing one page table: the pools are concatenated and instance 1's table offset. The
  table points sequence 1's first page out of range: NaN for it in both instances, and
  nothing written into another page, spare or not."""
  rng, n = _rng(request), 2
  instances = [
    decode_inputs(
      rng, batch=3, heads=8, kv_heads=2, capacity=512, seqlen_new=3, page_size=page_size
    )
    for _ in range(n)
  ]
  table = instances[0][6].at[1, 0].set(instances[0][1].shape[0])
  for arrays in instances:
    arrays[6] = table
  args = _stack(instances)
  args[6] = table
  results = _mapped(functools.partial(decode, num_splits=2), args, (0, 0, 0, 0, 0, 0, None))
  assert results[2].shape == (n,) + instances[0][1].shape
  for i in range(n):
    bad = assert_matches_the_oracle(instances[i], instance(results, i, 0))
    assert list(bad) == [False, True, False]


def test_vmap_paged_shared_pool_read_by_every_instance(request):
  """One pool, nothing appended, each instance its own queries, lengths and page table into
  the pool: every instance reads it, and it comes back unmapped (vmap refuses out_axes None
  for a mapped result) and unchanged."""
  rng, n = _rng(request), 3
  q, k_pool, v_pool, _, _, _, table = decode_inputs(
    rng, batch=2, heads=32, kv_heads=8, capacity=1024, seqlen_new=0, page_size=64
  )
  qs = jnp.asarray(rng.standard_normal((n,) + q.shape, np.float32), BF16)
  tables = jnp.stack(
    [
      jnp.asarray(rng.permutation(k_pool.shape[0])[: table.size], jnp.int32).reshape(table.shape)
      for _ in range(n)
    ]
  )
  lengths = jnp.asarray([[1024, 0], [700, 31], [64, 1023]], jnp.int32)
  results = _mapped(
    decode,
    (qs, k_pool, v_pool, lengths, None, None, tables),
    (0, None, None, 0, None, None, 0),
    out_axes=(0, 0, None, None),
  )
  assert results[2].shape == k_pool.shape
  for i in range(n):
    arrays = [qs[i], k_pool, v_pool, lengths[i], None, None, tables[i]]
    outputs = (results[0][i], results[1][i], results[2], results[3])
    assert not assert_matches_the_oracle(arrays, outputs).any()


# --- The sharding wrapper on a one-GPU mesh ------------------------------------------------


def _one_gpu_mesh(explicit):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(
    (1, 1), ("data", "model"), axis_types=(kind, kind), devices=jax.devices()[:1]
  )


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize(
  "spec",
  [P("data"), P(None, None, "model"), P("data", None, "model")],
  ids=["batch", "heads", "batch+heads"],
)
def test_sharded_contiguous_on_one_gpu(spec, explicit, request):
  """A contiguous cache split over the batch and/or the heads of a 1 x 1 mesh (GQA 4:1, two
  new tokens, a window): the wrapper's path (custom_partitioning or, on Explicit axes,
  shard_map) runs the kernel, and the results keep the inputs' shardings."""
  mesh = _one_gpu_mesh(explicit)
  arrays = decode_inputs(
    _rng(request), batch=4, heads=16, kv_heads=4, capacity=512, seqlen_q=2, seqlen_new=2
  )
  specs = [spec, spec, spec, P(spec[0]), spec, spec, None]
  results, hlo = run_sharded(arrays, specs, mesh, window_size=(200, -1))
  assert calls_the_kernel(hlo)
  assert not assert_matches_the_oracle(arrays, results, window=(200, -1)).any()
  lse = P(spec[0], spec[2] if len(spec) > 2 else None, None)
  assert_sharded_as(results, mesh, (spec, lse, spec, spec))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("q_batch", [False, True], ids=["heads", "q-batch+heads"])
def test_sharded_paged_on_one_gpu(q_batch, explicit, request):
  """A paged pool split over its k/v heads, the page table and lengths replicated, or with
  q (and the new tokens, lengths and table) also split over the batch, which a pool cannot
  follow; softcap. The pool keeps its heads sharding."""
  mesh = _one_gpu_mesh(explicit)
  arrays = decode_inputs(
    _rng(request), batch=3, heads=8, kv_heads=2, capacity=768, seqlen_new=1, page_size=32
  )
  heads = P(None, None, "model")
  q_spec = P("data", None, "model") if q_batch else heads
  per_sequence = P("data") if q_batch else P()
  specs = [q_spec, heads, heads, per_sequence, q_spec, q_spec, per_sequence]
  results, hlo = run_sharded(arrays, specs, mesh, softcap=20.0)
  assert calls_the_kernel(hlo)
  assert not assert_matches_the_oracle(arrays, results, softcap=20.0).any()
  assert_sharded_as(results[2:], mesh, (heads, heads))
