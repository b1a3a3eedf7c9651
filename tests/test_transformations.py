"""jit, grad, vmap (any in_axes, nested), checkpoint and scan, against plain loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3

pytestmark = pytest.mark.usefixtures("on_cpu")

attention = functools.partial(jax_fa3.flash_attention, causal=True, window_size=(6, -1))


def loss(q, k, v):
  return jnp.sum(attention(q, k, v).astype(jnp.float32) ** 2)


def assert_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.float32(a), np.float32(e), rtol=2e-2, atol=2e-2)


@pytest.fixture
def qkv(normal):
  return normal((2, 9, 4, 32)), normal((2, 11, 2, 32)), normal((2, 11, 2, 32))


def test_jit_matches_eager(qkv):
  assert_close(jax.jit(attention)(*qkv), attention(*qkv))
  assert_close(jax.jit(jax.grad(loss, (0, 1, 2)))(*qkv), jax.grad(loss, (0, 1, 2))(*qkv))


@pytest.mark.parametrize("in_axes", [(0, None, None), (None, 0, 0), (2, 0, None), (1, 3, 3)])
def test_vmap_any_in_axes(in_axes, normal, qkv):
  """A mapped axis anywhere, unmapped operands broadcast: equal to a loop."""
  size = 3
  args = [
    x if axis is None else jnp.stack([normal(x.shape) for _ in range(size)], axis)
    for x, axis in zip(qkv, in_axes)
  ]
  take = lambda i: [x if a is None else jnp.take(x, i, a) for x, a in zip(args, in_axes)]
  expected = jnp.stack([attention(*take(i)) for i in range(size)])
  assert_close(jax.vmap(attention, in_axes)(*args), expected)
  expected_grads = [
    jnp.stack(g) for g in zip(*[jax.grad(loss, (0, 1, 2))(*take(i)) for i in range(size)])
  ]
  grads = jax.vmap(jax.grad(loss, (0, 1, 2)), in_axes)(*args)
  assert_close(grads, expected_grads)


def test_nested_vmap(normal):
  q = normal((3, 2, 2, 9, 4, 32))
  k, v = normal((2, 2, 11, 2, 32)), normal((2, 11, 2, 32))
  inner = jax.vmap(attention, in_axes=(0, 0, None))
  outer = jax.vmap(inner, in_axes=(0, None, None))
  expected = jnp.stack(
    [jnp.stack([attention(q[i, j], k[j], v) for j in range(2)]) for i in range(3)]
  )
  assert_close(outer(q, k, v), expected)


def test_grad_of_vmap(normal, qkv):
  q = jnp.stack([normal(qkv[0].shape) for _ in range(3)])
  _, k, v = qkv
  total = lambda q, k, v: jnp.sum(jax.vmap(loss, (0, None, None))(q, k, v))
  expected = jax.grad(lambda q, k, v: sum(loss(q[i], k, v) for i in range(3)), (0, 1, 2))
  assert_close(jax.grad(total, (0, 1, 2))(q, k, v), expected(q, k, v))


def test_checkpoint(qkv):
  assert_close(jax.grad(jax.checkpoint(loss), (0, 1, 2))(*qkv), jax.grad(loss, (0, 1, 2))(*qkv))


def test_scan_over_layers(normal):
  """A stack of attention layers under lax.scan, differentiated: equal to the unrolled loop."""
  x = normal((2, 9, 4, 32))
  kv = normal((3, 2, 9, 4, 32))  # one k/v per layer

  def step(x, kv_layer):
    return attention(x, kv_layer, kv_layer) + x, None

  def scanned(x, kv):
    return jnp.sum(jax.lax.scan(step, x, kv)[0].astype(jnp.float32) ** 2)

  def unrolled(x, kv):
    for layer in range(kv.shape[0]):
      x = step(x, kv[layer])[0]
    return jnp.sum(x.astype(jnp.float32) ** 2)

  assert_close(jax.grad(scanned, (0, 1))(x, kv), jax.grad(unrolled, (0, 1))(x, kv))


def test_vmap_of_seq_lengths(normal):
  """Batched seq lengths fold into the batch axis together with the arrays."""
  q, k = normal((3, 2, 8, 4, 32)), normal((2, 10, 4, 32))
  q_lengths = jnp.array([[3, 8], [0, 5], [8, 1]], jnp.int32)
  kv_lengths = jnp.array([10, 4], jnp.int32)
  fn = lambda q, lq: jax_fa3.dot_product_attention(
    q, k, k, is_causal=True, query_seq_lengths=lq, key_value_seq_lengths=kv_lengths
  )
  expected = jnp.stack([fn(q[i], q_lengths[i]) for i in range(3)])
  assert_close(jax.vmap(fn)(q, q_lengths), expected)


def _bwd_value_head_dims(jaxpr):
  """The head dim of v in every fa3_bwd equation, through nested jaxprs."""
  dims = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "fa3_bwd":
      dims.append(eqn.invars[3].aval.shape[-1])
    for param in jax.tree.leaves(eqn.params, is_leaf=lambda p: hasattr(p, "eqns")):
      if hasattr(param, "eqns"):
        dims += _bwd_value_head_dims(param)
  return dims


@pytest.mark.parametrize("wrap", ["plain", "checkpoint", "scan"])
def test_lse_cotangent_only_when_used(wrap, qkv):
  """The backward runs at v's own head dim unless the lse is differentiated, which adds
  one value column (see attention._attention_bwd)."""

  def uses(lse_too):
    def f(q, k, v):
      out, lse = jax_fa3.flash_attention(q, k, v, return_lse=True)
      return jnp.sum(out.astype(jnp.float32)) + (jnp.sum(jnp.tanh(lse)) if lse_too else 0.0)

    if wrap == "checkpoint":
      return jax.checkpoint(f)
    if wrap == "scan":
      return lambda q, k, v: jax.lax.scan(lambda c, _: (c + f(q, k, v), None), 0.0, None, 2)[0]
    return f

  head_dim = qkv[2].shape[-1]
  assert set(_bwd_value_head_dims(jax.make_jaxpr(jax.grad(uses(False)))(*qkv))) == {head_dim}
  assert set(_bwd_value_head_dims(jax.make_jaxpr(jax.grad(uses(True)))(*qkv))) == {head_dim + 1}
