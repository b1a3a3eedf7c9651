"""Attention sinks and the max logit with the arrays sharded: sinks split with the heads,
applied once after a ring's merge (all-gather: in each device's calls), dsinks and
max_logit reduced over the sequence's devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_fa3
from sharding_checks import assert_all_gather


def sinks_and_grads(**kwargs):
  """(q, k, v, dout, sinks) -> out, lse, max_logit and the four gradients (the lse's
  cotangent nonzero too, so that the sinks' lse term is on the path)."""

  def run(q, k, v, dout, sinks):
    fn = functools.partial(
      jax_fa3.flash_attention, return_lse=True, return_max_logit=True, **kwargs
    )
    (out, lse, max_logit), pullback = jax.vjp(
      lambda q, k, v, s: fn(q, k, v, sinks=s), q, k, v, sinks
    )
    dq, dk, dv, dsinks = pullback((dout, jnp.ones_like(lse), jnp.zeros_like(max_logit)))
    return dict(out=out, lse=lse, max_logit=max_logit, dq=dq, dk=dk, dv=dv, dsinks=dsinks)

  return run


def inputs(normal, seqlen=32, heads=4, kv_heads=2, batch=2, head_dim=16):
  q_shape, kv_shape = (batch, seqlen, heads, head_dim), (batch, seqlen, kv_heads, head_dim)
  return [
    normal(q_shape, jnp.float16),
    normal(kv_shape, jnp.float16),
    normal(kv_shape, jnp.float16),
    normal(q_shape, jnp.float16),
    normal((heads,), jnp.float32),
  ]


@pytest.mark.parametrize(
  "kwargs, collective",
  [
    (dict(causal=True, context_parallel="ring"), "all-to-all"),  # striped ring
    (dict(context_parallel="ring"), "collective-permute"),  # contiguous ring, every block whole
    (dict(causal=True, window_size=(5, 0), context_parallel="ring"), "collective-permute"),
  ],
  ids=["causal-striped", "full", "window"],
)
def test_sinks_on_a_ring(kwargs, collective, normal, compare, make_mesh, collectives):
  mesh = make_mesh((4,), ("seq",))
  seq = P(None, "seq")
  _, hlo = compare(sinks_and_grads(**kwargs), inputs(normal), [seq] * 4 + [P()], mesh)
  assert collective in collectives(hlo) and "all-gather" not in collectives(hlo)


@pytest.mark.parametrize("context_parallel", ["ring", "all_gather"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_sinks_split_with_the_heads_and_batch(
  explicit, context_parallel, normal, compare, make_mesh, collectives
):
  mesh = make_mesh((2, 2, 2), ("data", "seq", "model"), explicit)
  spec = P("data", "seq", "model")
  actual, _ = compare(
    sinks_and_grads(causal=True, context_parallel=context_parallel),
    inputs(normal, heads=8, kv_heads=4),
    [spec] * 4 + [P("model")],
    mesh,
  )
  assert actual["max_logit"].shape == (2, 8)


@pytest.mark.parametrize(
  "kwargs, zigzag",
  [(dict(causal=True), True), (dict(), False), (dict(causal=True, window_size=(5, 0)), False)],
  ids=["causal-zigzag", "full", "window"],
)
def test_sinks_all_gathered(kwargs, zigzag, normal, compare, make_mesh):
  mesh = make_mesh((4,), ("seq",))
  seq = P(None, "seq")
  fn = sinks_and_grads(context_parallel="all_gather", **kwargs)
  _, hlo = compare(fn, inputs(normal), [seq] * 4 + [P()], mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=zigzag)


@pytest.mark.parametrize("context_parallel", ["ring", "all_gather"])
def test_sinks_on_packed_sequences(context_parallel, normal, compare, make_mesh):
  mesh = make_mesh((4,), ("seq",))
  ids = jnp.asarray(
    np.repeat(np.arange(6), [3, 9, 1, 12, 5, 2])[None].repeat(2, 0).astype(np.int32)
  )
  fn = sinks_and_grads(causal=True, segment_ids=ids, context_parallel=context_parallel)
  compare(fn, inputs(normal), [P(None, "seq")] * 4 + [P()], mesh)
