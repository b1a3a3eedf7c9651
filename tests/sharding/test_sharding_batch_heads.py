"""Batch and head sharding: the shards stay where they are, with no all-gather."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa3


def qkv_dout(normal, heads, kv_heads, dtype=jnp.bfloat16, batch=4, seqlen=16, head_dim=16):
  q_shape, kv_shape = (batch, seqlen, heads, head_dim), (batch, seqlen, kv_heads, head_dim)
  return [normal(s, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
  "explicit, spec",
  [
    (False, P("data")),
    (False, P(None, None, "model")),
    (False, P("data", None, "model")),
    (True, P("data", None, "model")),
  ],
  ids=["batch", "heads", "batch+heads", "explicit"],
)
def test_batch_and_heads_run_locally(
  explicit, spec, causal, normal, compare, make_mesh, collectives, forward_and_vjp
):
  """GQA with k/v heads split like q's: no collective at all, outputs and gradients
  sharded like their inputs."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  attention = functools.partial(jax_fa3.flash_attention, causal=causal)
  actual, hlo = compare(forward_and_vjp(attention), qkv_dout(normal, 8, 4), [spec] * 4, mesh)
  assert collectives(hlo) == set()
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_more_head_shards_than_kv_heads(
  explicit, kv_heads, normal, compare, make_mesh, collectives, forward_and_vjp
):
  """8 query heads over 4 devices, 2 or 1 k/v heads, replicated: each device slices the
  k/v head its queries read. The k/v gradients are summed over the devices sharing a
  head (an all-reduce); q, k and v are never gathered."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  arrays = qkv_dout(normal, 8, kv_heads, jnp.float16)
  heads = P(None, None, "model")
  actual, hlo = compare(
    forward_and_vjp(jax_fa3.flash_attention), arrays, [heads, P(), P(), heads], mesh
  )
  assert collectives(hlo) == {"all-reduce"}
  assert actual["out"].sharding.spec[2] == "model"
  assert actual["dk"].sharding.is_fully_replicated


def test_replicated_on_an_explicit_mesh(normal, compare, make_mesh, collectives, forward_and_vjp):
  """Under an Explicit mesh, replicated arrays run on each device whole (XLA fails to
  compile custom_partitioning there)."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit=True)
  with jax.set_mesh(mesh):
    _, hlo = compare(
      forward_and_vjp(jax_fa3.flash_attention), qkv_dout(normal, 4, 2), [P()] * 4, mesh
    )
  assert collectives(hlo) == set()


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_split_head_dim_is_gathered(
  explicit, normal, compare, make_mesh, collectives, forward_and_vjp
):
  """The documented fallback, and a check that `collectives` sees gathers: a split head
  dim is gathered before the call. The results keep their inputs' shardings (in Explicit
  mode they are part of the types, which the cotangent must match)."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  spec = P("data", None, None, "model")
  actual, hlo = compare(
    forward_and_vjp(jax_fa3.flash_attention), qkv_dout(normal, 4, 4), [spec] * 4, mesh
  )
  assert "all-gather" in collectives(hlo)
  for x in actual.values():
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_dot_product_attention_with_lengths(
  normal, compare, make_mesh, collectives, forward_and_vjp
):
  """jax.nn's semantics with per-sequence lengths, split over the batch: the lengths are
  split with it."""
  mesh = make_mesh((4, 2), ("data", "model"))
  q, k, v, dout = qkv_dout(normal, 4, 2, jnp.float16)
  lengths_q, lengths_kv = jnp.array([5, 16, 0, 9], jnp.int32), jnp.array([16, 3, 7, 0], jnp.int32)

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  spec = P("data", None, "model")
  _, hlo = compare(run, [q, k, v, dout, lengths_q, lengths_kv], [spec] * 4 + [P("data")] * 2, mesh)
  assert collectives(hlo) == set()


def test_vmap_of_grad(normal, compare, make_mesh):
  """vmap folds into the batch, which stays split."""
  mesh = make_mesh((2, 4), ("data", "model"))
  q, k = normal((3, 4, 16, 8, 16)), normal((4, 16, 4, 16))
  loss = lambda q, k: jnp.sum(
    jax_fa3.flash_attention(q, k, k, causal=True).astype(jnp.float32) ** 2
  )
  grads = lambda q, k: dict(zip(("dq", "dk"), jax.vmap(jax.grad(loss, (0, 1)), (0, None))(q, k)))
  compare(grads, [q, k], [P(None, "data", None, "model"), P("data", None, "model")], mesh)


def test_inside_shard_map_the_shards_are_the_arrays(normal, make_mesh, assert_close):
  """Under shard_map over every axis, attention runs on each device's shard as given;
  over some axes only, the others are gathered as the call needs (XLA cannot
  custom-partition inside a partly manual computation)."""
  mesh = make_mesh((2, 4), ("data", "seq"))
  q = normal((2, 32, 4, 16))
  attention = functools.partial(jax_fa3.flash_attention, causal=True)
  every_axis = jax.jit(
    jax.shard_map(attention, mesh=mesh, in_specs=P("data", "seq"), out_specs=P("data", "seq"))
  )
  per_shard = np.concatenate([attention(*[q[:, i : i + 8]] * 3) for i in range(0, 32, 8)], 1)
  assert_close(every_axis(q, q, q), per_shard, q.dtype)
  batch_only = jax.jit(
    jax.shard_map(
      attention, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}
    )
  )
  assert_close(batch_only(q, q, q), attention(q, q, q), q.dtype)
