"""Sharded attention on several GPUs, against the same jitted function on one GPU (issue 7).

`flash_attention` and `dot_product_attention` under `jax.jit` on arrays split over the
batch, the heads (GQA, MQA) and the sequence (ring attention, striped and contiguous; and
all-gather attention, zigzag and contiguous), and packed sequences (segment ids) on both,
forward and gradients, over all visible GPUs (P >= 2, at most 8; the sizes follow P).
Each result must be within 2 eps(dtype) of max|unsharded| (tests/sharding_checks.py, as
in tests/sharding/), and the compiled program must communicate as README's table says:
nothing for batch and heads, collective-permutes and no all-gather for the ring, K/V
gathered and their gradients reduce-scattered for all-gather. On GPUs
the program must also call the kernels (the backward's where one is compiled).

The tests skip, with the reason, where fewer than 2 devices are visible (and a test that
needs a 2-D mesh where fewer than 4 are). To check them without GPUs,
JAX_FA3_MULTI_DEVICE_PLATFORM=cpu runs them at smaller sizes on CPU devices (the float32
reference path):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      JAX_FA3_MULTI_DEVICE_PLATFORM=cpu python -m pytest tests/gpu/test_multi_gpu.py
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_fa3
from jax_fa3 import sharding
from jax_fa3._kernels import BWD_TARGET, FWD_TARGET
from jax_fa3.primitives import AttentionParams
from documents import random_documents
from sharding_checks import (
  assert_all_gather,
  assert_close,
  assert_packed_ring,
  collectives,
  forward_and_vjp,
)

PLATFORM = os.environ.get("JAX_FA3_MULTI_DEVICE_PLATFORM", "gpu")
ON_GPU = PLATFORM == "gpu"
# tests/gpu/conftest.py leaves the skipping of this module to the module: by device count.
CHECKS_ITS_OWN_DEVICES = True


def _devices():
  try:
    return jax.devices(PLATFORM)[:8]
  except RuntimeError:  # no such backend
    return []


DEVICES = _devices()
NUM = len(DEVICES)  # P, the devices each test splits over
pytestmark = pytest.mark.skipif(
  NUM < 2, reason=f"needs 2 or more {PLATFORM.upper()} devices; {NUM} visible"
)

# The unit of sequence lengths: GPU-sized, or small for the float32 reference on CPUs.
SEQ = 1024 if ON_GPU else 16
BF16, FP16 = jnp.bfloat16, jnp.float16
# The strategy for a split sequence, forced: at these sizes "auto" all-gathers.
RING, ALL_GATHER = dict(context_parallel="ring"), dict(context_parallel="all_gather")


def mesh_of(shape, names, explicit=False):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(
    shape, names, axis_types=(kind,) * len(names), devices=DEVICES[: int(np.prod(shape))]
  )


def qkv_dout(normal, *, batch, seqlen_q, seqlen_k=None, heads, kv_heads, head_dim, dtype):
  q_shape = (batch, seqlen_q, heads, head_dim)
  kv_shape = (batch, seqlen_k or seqlen_q, kv_heads, head_dim)
  return [normal(s, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


@pytest.fixture
def compare(request, largest_differences):
  """`compare(fn, arrays, specs, mesh)`: jit(fn), where fn returns a dict of arrays, on the
  arrays sharded as `specs` over `mesh` equals jit(fn) on one device with the arrays
  whole, within 2 eps(dtype of the first array) of the largest value. Returns the sharded
  results and the compiled HLO text of the sharded program."""

  def run(fn, arrays, specs, mesh):
    whole = [jax.device_put(x, DEVICES[0]) for x in arrays]
    expected = jax.jit(fn)(*whole)
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(arrays, specs)]
    compiled = jax.jit(fn).lower(*sharded).compile()
    actual = compiled(*sharded)
    hlo = compiled.as_text()
    dtype = arrays[0].dtype
    for name, e in expected.items():
      assert actual[name].shape == e.shape and actual[name].dtype == e.dtype, name
      difference, scale = assert_close(actual[name], e, dtype, name)
      largest_differences.record(request.node.name, dtype, name, difference, scale)
    if ON_GPU:
      _assert_kernels_called(
        hlo, dtype, arrays[0].shape[-1], gradients=any(name.startswith("d") for name in expected)
      )
    return actual, hlo

  return run


def _assert_kernels_called(hlo, dtype, head_dim, gradients):
  """The forward kernel always (every head dim here is compiled); the backward's where
  the extension has one for this dtype and head dim and it is enabled."""
  assert f'custom_call_target="{FWD_TARGET}"' in hlo, "the forward kernel is not called"
  status = jax_fa3.kernels_available()
  if gradients and status.head_dims_for("bwd", dtype, head_dim, head_dim):
    assert f'custom_call_target="{BWD_TARGET}"' in hlo, "the backward kernel is not called"


def assert_ring(hlo):
  """K/V chunks go round the ring: collective-permutes, and nothing is gathered."""
  found = collectives(hlo)
  assert "collective-permute" in found and "all-gather" not in found, found


def chosen_split(mesh, specs, arrays, window, context_parallel="auto"):
  q, k = arrays[:2]
  params = AttentionParams(1.0, window_left=window[0], window_right=window[1])
  return sharding.choose_split(
    dict(mesh.shape),
    specs[0],
    specs[1],
    q.shape,
    k.shape,
    params,
    context_parallel=context_parallel,
  )


def test_devices_are_distinct_accelerators():
  assert len({d.id for d in DEVICES}) == NUM
  if ON_GPU:
    assert jax_fa3.kernels_available(), str(jax_fa3.kernels_available())


# --- Batch and heads: each device attends to its shards, with no communication ----------


@pytest.mark.parametrize(
  "split, explicit, dtype, head_dim, causal",
  [
    ("batch", False, BF16, 128, True),
    ("batch", False, FP16, 64, False),
    ("heads", False, BF16, 128, True),
    ("heads", False, FP16, 64, False),
    ("batch", True, BF16, 128, True),
  ],
  ids=[
    "batch-bf16-d128-causal",
    "batch-fp16-d64-full",
    "heads-bf16-d128-causal",
    "heads-fp16-d64-full",
    "batch-explicit-bf16-d128-causal",
  ],
)
def test_batch_and_heads_run_locally(split, explicit, dtype, head_dim, causal, normal, compare):
  """GQA (4 query heads a k/v head) with the k/v heads split like q's: no collective at
  all, and outputs and gradients sharded like their inputs."""
  mesh = mesh_of((NUM,), ("x",), explicit)
  spec = P("x") if split == "batch" else P(None, None, "x")
  arrays = qkv_dout(
    normal,
    batch=2 * NUM if split == "batch" else 2,
    seqlen_q=SEQ,
    heads=4 * NUM,
    kv_heads=NUM,
    head_dim=head_dim,
    dtype=dtype,
  )
  attention = functools.partial(jax_fa3.flash_attention, causal=causal)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [spec] * 4, mesh)
  assert collectives(hlo) == set()
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_more_head_shards_than_kv_heads(normal, compare):
  """MQA: one k/v head, replicated, and the query heads split: each device reads the k/v
  head whole, and the devices' parts of its gradients are summed (an all-reduce); q, k
  and v are never gathered."""
  mesh = mesh_of((NUM,), ("x",))
  heads = P(None, None, "x")
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=SEQ, heads=4 * NUM, kv_heads=1, head_dim=128, dtype=BF16
  )
  attention = functools.partial(jax_fa3.flash_attention, causal=True)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [heads, P(), P(), heads], mesh)
  found = collectives(hlo)
  assert "all-reduce" in found and not found & {"all-gather", "all-to-all"}, found
  assert actual["out"].sharding.spec[2] == "x"
  assert actual["dk"].sharding.is_fully_replicated


def _lengths(total, batch, salt):
  """Per-sequence lengths in [0, total], with 0 and total among them."""
  return jnp.asarray(
    [(0, total, total // 3 + salt, total - 1 - salt)[i % 4] for i in range(batch)], jnp.int32
  )


def test_dot_product_attention_with_lengths_split_over_the_batch(normal, compare):
  """jax.nn's semantics with per-sequence lengths: the lengths are split with the batch."""
  mesh = mesh_of((NUM,), ("x",))
  batch = 2 * NUM
  arrays = qkv_dout(
    normal, batch=batch, seqlen_q=SEQ, heads=8, kv_heads=2, head_dim=128, dtype=FP16
  )
  lengths = [_lengths(SEQ, batch, 5), _lengths(SEQ, batch, 2)[::-1]]

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  _, hlo = compare(run, arrays + lengths, [P("x")] * 6, mesh)
  assert collectives(hlo) == set()


# --- The sequence: ring attention ----------------------------------------------------------


def _square_length():
  """A length the striped layout takes: the first multiple of P * P from 4 SEQ."""
  return -(-4 * SEQ // NUM**2) * NUM**2


def _odd_length():
  """A length the ring splits but cannot stripe, about 2 SEQ: P chunks of c P + 1."""
  return NUM * (max(1, 2 * SEQ // NUM**2) * NUM + 1)


@pytest.mark.parametrize(
  "dtype, head_dim, window, length, striped",
  [
    (BF16, 128, (-1, -1), _square_length, False),
    (BF16, 128, (-1, 0), _square_length, True),
    (FP16, 64, (-1, 0), _square_length, True),
    (BF16, 128, (-1, 0), _odd_length, False),
    (FP16, 64, (-1, -1), _odd_length, False),
    (BF16, 128, (SEQ // 2 + 3, 0), _square_length, False),
  ],
  ids=[
    "full-bf16-d128",
    "causal-striped-bf16-d128",
    "causal-striped-fp16-d64",
    "causal-contiguous-bf16-d128",
    "full-odd-chunks-fp16-d64",
    "band-bf16-d128",
  ],
)
def test_ring(dtype, head_dim, window, length, striped, normal, compare):
  """The sequence split over all devices, GQA: a causal mask runs striped where the length
  is a multiple of P * P, contiguous (unbalanced) otherwise; a band (sliding window) runs
  contiguous, skipping the blocks it does not reach."""
  mesh = mesh_of((NUM,), ("x",))
  spec = P(None, "x")
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=length(), heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype
  )
  split = chosen_split(mesh, [spec, spec], arrays, window, "ring")
  assert split.sequence == ("x",) and split.striped == striped
  attention = functools.partial(jax_fa3.flash_attention, window_size=window, **RING)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [spec] * 4, mesh)
  assert_ring(hlo)
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_ring_on_an_explicit_mesh(normal, compare):
  """Explicit axes: the ring runs under shard_map, set up as the arrays are traced."""
  mesh = mesh_of((NUM,), ("x",), explicit=True)
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=_square_length(), heads=8, kv_heads=2, head_dim=128, dtype=BF16
  )
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **RING)
  _, hlo = compare(forward_and_vjp(attention), arrays, [P(None, "x")] * 4, mesh)
  assert_ring(hlo)


def test_ring_cross_attention_of_different_lengths(normal, compare):
  """Without a mask the chunks of q and of k/v may differ in length."""
  mesh = mesh_of((NUM,), ("x",))
  arrays = qkv_dout(
    normal,
    batch=2,
    seqlen_q=SEQ // 2 * NUM,
    seqlen_k=3 * SEQ // 2 * NUM,
    heads=8,
    kv_heads=2,
    head_dim=64,
    dtype=FP16,
  )
  attention = functools.partial(jax_fa3.flash_attention, **RING)
  _, hlo = compare(forward_and_vjp(attention), arrays, [P(None, "x")] * 4, mesh)
  assert_ring(hlo)


def test_ring_lse_and_its_gradient(normal, compare):
  """The log-sum-exp merged over the ring, and the gradient through it."""
  mesh = mesh_of((NUM,), ("x",))
  length = _square_length()
  arrays = qkv_dout(normal, batch=2, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  dlse = normal((2, 8, length), jnp.float32)

  def run(q, k, v, dout, dlse):
    attention = functools.partial(jax_fa3.flash_attention, causal=True, return_lse=True, **RING)
    (out, lse), pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback((dout, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  seq = P(None, "x")
  _, hlo = compare(run, arrays + [dlse], [seq] * 4 + [P(None, None, "x")], mesh)
  assert_ring(hlo)


def test_ring_dot_product_attention_with_lengths(normal, compare):
  """Per-sequence lengths on a striped ring (jax.nn's top-left causal mask)."""
  mesh = mesh_of((NUM,), ("x",))
  length = _square_length()
  arrays = qkv_dout(normal, batch=4, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  lengths = [_lengths(length, 4, 7), _lengths(length, 4, 3)[::-1]]

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
      **RING,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  _, hlo = compare(run, arrays + lengths, [P(None, "x")] * 4 + [P()] * 2, mesh)
  assert_ring(hlo)


@pytest.mark.skipif(2 <= NUM < 4, reason=f"a 2 x P/2 mesh needs 4 or more devices; {NUM} visible")
def test_batch_sequence_and_heads_together(normal, compare):
  """A 2-D mesh: the batch split in two, and the sequence (a causal ring) over P/2."""
  half = NUM // 2
  mesh = mesh_of((2, half), ("data", "seq"))
  spec = P("data", "seq")
  length = -(-4 * SEQ // half**2) * half**2
  arrays = qkv_dout(normal, batch=4, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **RING)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [spec] * 4, mesh)
  assert_ring(hlo)
  assert actual["out"].sharding.spec[:2] == ("data", "seq")


# --- The sequence: all-gather attention -------------------------------------------------


def _zigzag(length, window):
  """Whether all-gather runs zigzag: a mask bounded on one side, 2P halves of the queries."""
  return ((window[0] >= 0) + (window[1] >= 0)) == 1 and length % (2 * NUM) == 0


@pytest.mark.parametrize(
  "dtype, head_dim, window, length, explicit",
  [
    (BF16, 128, (-1, -1), _square_length, False),
    (BF16, 128, (-1, 0), _square_length, False),
    (FP16, 64, (-1, 0), _square_length, True),
    (BF16, 128, (-1, 0), _odd_length, False),
    (BF16, 128, (SEQ // 2 + 3, 0), _square_length, False),
  ],
  ids=[
    "full-bf16-d128",
    "causal-zigzag-bf16-d128",
    "causal-zigzag-explicit-fp16-d64",
    "causal-odd-chunks-bf16-d128",
    "band-bf16-d128",
  ],
)
def test_all_gather(dtype, head_dim, window, length, explicit, normal, compare):
  """The sequence split over all devices, GQA, K/V all-gathered (forced): a causal mask
  runs zigzag where 2P divides the length (each device two halves, one call each),
  contiguous otherwise; q is never gathered, dK/dV are reduce-scattered."""
  mesh = mesh_of((NUM,), ("x",), explicit)
  spec = P(None, "x")
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=length(), heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype
  )
  zigzag = _zigzag(length(), window)
  split = chosen_split(mesh, [spec, spec], arrays, window, "all_gather")
  assert (split.sequence, split.strategy, split.zigzag) == (("x",), "all_gather", zigzag)
  attention = functools.partial(jax_fa3.flash_attention, window_size=window, **ALL_GATHER)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [spec] * 4, mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=zigzag)
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_all_gather_takes_masked_lengths_the_ring_cannot(normal, compare):
  """Causal, 2 SEQ queries against 3 SEQ keys (bottom-right): no ring can split it (the
  chunks differ, and SEQ is no multiple of P * P for every P), so "auto" all-gathers."""
  mesh = mesh_of((NUM,), ("x",))
  arrays = qkv_dout(
    normal,
    batch=2,
    seqlen_q=2 * SEQ,
    seqlen_k=3 * SEQ + NUM,
    heads=8,
    kv_heads=2,
    head_dim=128,
    dtype=BF16,
  )
  split = chosen_split(mesh, [P(None, "x")] * 2, arrays, (-1, 0))
  assert split.strategy == "all_gather", split.reason
  attention = functools.partial(jax_fa3.flash_attention, causal=True)
  _, hlo = compare(forward_and_vjp(attention), arrays, [P(None, "x")] * 4, mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=split.zigzag)


def test_all_gather_lse_and_its_gradient_by_default(normal, compare):
  """At these sizes "auto" all-gathers (strategy.py's cost model): the lse, and the
  gradient through it."""
  mesh = mesh_of((NUM,), ("x",))
  length = _square_length()
  arrays = qkv_dout(normal, batch=2, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  assert chosen_split(mesh, [P(None, "x")] * 2, arrays, (-1, 0)).strategy == "all_gather"
  dlse = normal((2, 8, length), jnp.float32)

  def run(q, k, v, dout, dlse):
    attention = functools.partial(jax_fa3.flash_attention, causal=True, return_lse=True)
    (out, lse), pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback((dout, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  seq = P(None, "x")
  _, hlo = compare(run, arrays + [dlse], [seq] * 4 + [P(None, None, "x")], mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=True)


def test_all_gather_dot_product_attention_with_lengths(normal, compare):
  """Per-sequence lengths (jax.nn's top-left causal mask), zigzag: each half's lengths cut
  to its place in the sequence."""
  mesh = mesh_of((NUM,), ("x",))
  length = _square_length()
  arrays = qkv_dout(normal, batch=4, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  lengths = [_lengths(length, 4, 7), _lengths(length, 4, 3)[::-1]]

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
      **ALL_GATHER,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  _, hlo = compare(run, arrays + lengths, [P(None, "x")] * 4 + [P()] * 2, mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=True)


# --- Packed sequences (segment ids) on the ring -----------------------------------------


def _packed_ids(length, mean, seed):
  """One row of documents of 1 to 2 `mean` tokens (some straddle the chunks, some sit inside
  one), the last 5% padding (-1); a second row of a few long documents."""
  rng = np.random.default_rng(seed)
  ids = np.stack(
    [random_documents(rng, length, mean_length) for mean_length in (mean, 3 * length // 8)]
  )
  ids[0, length - length // 20 :] = -1
  return ids


@pytest.mark.parametrize(
  "dtype, head_dim, causal, window, explicit",
  [
    (BF16, 128, True, (-1, -1), False),
    (FP16, 64, False, (-1, -1), False),
    (BF16, 128, True, (SEQ // 2 + 3, -1), False),
    (BF16, 128, True, (-1, -1), True),
  ],
  ids=["causal-bf16-d128", "full-fp16-d64", "causal-window-bf16-d128", "causal-explicit-bf16-d128"],
)
def test_packed_ring(dtype, head_dim, causal, window, explicit, normal, compare):
  """Documents of ~SEQ / 2 tokens packed into rows of 2 SEQ P, GQA: the sequence runs as a
  contiguous ring whose K/V chunks carry their rows, skipping the blocks of other
  documents; nothing but the int32 ids is gathered."""
  mesh = mesh_of((NUM,), ("x",), explicit)
  spec = P(None, "x")
  length = 2 * SEQ * NUM
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=length, heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype
  )
  ids = _packed_ids(length, SEQ // 2, seed=head_dim + causal)
  split = sharding.choose_split(
    dict(mesh.shape),
    spec,
    spec,
    arrays[0].shape,
    arrays[1].shape,
    AttentionParams(1.0, window_left=window[0], window_right=0 if causal else window[1]),
    packed=True,
    context_parallel="ring",
  )
  assert split.sequence == ("x",) and not split.striped

  def run(q, k, v, dout, ids):
    attention = functools.partial(
      jax_fa3.flash_attention, segment_ids=ids, causal=causal, window_size=window, **RING
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  actual, hlo = compare(run, arrays + [ids], [spec] * 5, mesh)
  assert_packed_ring(hlo)
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


@pytest.mark.parametrize(
  "causal, window, explicit",
  [(True, (-1, -1), False), (False, (-1, -1), False), (True, (SEQ // 2 + 3, -1), True)],
  ids=["causal", "full", "causal-window-explicit"],
)
def test_packed_all_gather(causal, window, explicit, normal, compare):
  """Packed documents by default: K/V and their rows gathered, one call a device whose
  keys' rows are cut to its queries (the backward kernel walks them); bf16, d128, GQA."""
  mesh = mesh_of((NUM,), ("x",), explicit)
  spec = P(None, "x")
  length = 2 * SEQ * NUM
  arrays = qkv_dout(normal, batch=2, seqlen_q=length, heads=8, kv_heads=2, head_dim=128, dtype=BF16)
  ids = _packed_ids(length, SEQ // 2, seed=7 + causal)

  def run(q, k, v, dout, ids):
    attention = functools.partial(
      jax_fa3.flash_attention, segment_ids=ids, causal=causal, window_size=window
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  actual, hlo = compare(run, arrays + [ids], [spec] * 5, mesh)
  assert_all_gather(hlo, kv_heads=2)
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


# --- Attention sinks and the max logit ------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal-striped", "full"])
@pytest.mark.parametrize("context_parallel", ["ring", "all_gather"])
def test_sinks_and_max_logit_on_a_split_sequence(causal, context_parallel, normal, compare):
  """Sinks applied once after the ring's merge (all-gather: in each device's calls), max
  logit and dsinks reduced over the devices: equal to the single-device kernels (lse
  cotangent included, for the sinks' lse term)."""
  mesh = mesh_of((NUM,), ("x",))
  seq = P(None, "x")
  arrays = qkv_dout(
    normal, batch=2, seqlen_q=SEQ * NUM, heads=8, kv_heads=2, head_dim=64, dtype=BF16
  ) + [normal((8,), jnp.float32)]

  def run(q, k, v, dout, sinks):
    fn = lambda q, k, v, s: jax_fa3.flash_attention(
      q,
      k,
      v,
      causal=causal,
      sinks=s,
      return_lse=True,
      return_max_logit=True,
      context_parallel=context_parallel,
    )
    (out, lse, max_logit), pullback = jax.vjp(fn, q, k, v, sinks)
    dq, dk, dv, dsinks = pullback((dout, jnp.ones_like(lse), jnp.zeros_like(max_logit)))
    return dict(out=out, lse=lse, max_logit=max_logit, dq=dq, dk=dk, dv=dv, dsinks=dsinks)

  _, hlo = compare(run, arrays, [seq] * 4 + [P()], mesh)
  if context_parallel == "ring":
    assert_ring(hlo)
  else:
    assert_all_gather(hlo, kv_heads=2, zigzag=causal)
