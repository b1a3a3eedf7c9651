"""Attention sinks and return_max_logit through the public API on the reference path
(CPU), against the float64 oracle (tests/oracle.py); and their argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
import oracle
from jax_fa3 import reference

pytestmark = pytest.mark.usefixtures("on_cpu")


def _check(name, actual, expected, dtype, ulps):
  """Equal where the oracle is infinite; else within ulps * eps(dtype) * max|expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  finite = np.isfinite(expected)
  np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=name)
  error = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
  bound = ulps * float(jnp.finfo(dtype).eps) * np.abs(expected[finite]).max(initial=0.0) + 1e-5
  assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window, softcap)
CASES = [
  (2, 37, 37, 8, 1, 32, True, (-1, -1), 0.0),  # GQA 8:1
  (1, 50, 20, 4, 2, 64, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k: key-less rows
  (2, 13, 61, 4, 4, 16, False, (5, 5), 0.0),  # a band: some rows see few keys
  (1, 40, 40, 2, 1, 64, True, (7, -1), 20.0),  # sliding window, softcap
  (1, 30, 30, 2, 2, 16, False, (0, 0), 0.0),  # one key per row
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("sink_scale", [1.0, 30.0], ids=["sinks", "large-sinks"])
def test_sinks_match_the_oracle(case, sink_scale, normal):
  batch, sq, sk, heads, kv_heads, d, causal, window, softcap = case
  q, k, v = (
    normal((batch, sq, heads, d)),
    normal((batch, sk, kv_heads, d)),
    normal((batch, sk, kv_heads, d)),
  )
  dout, dlse = normal((batch, sq, heads, d)), normal((batch, heads, sq), jnp.float32)
  sinks = normal((heads,), jnp.float32) * sink_scale
  run = functools.partial(
    jax_fa3.flash_attention,
    causal=causal,
    window_size=window,
    softcap=softcap,
    return_lse=True,
    return_max_logit=True,
  )
  (out, lse, max_logit), pullback = jax.vjp(
    lambda q, k, v, s: run(q, k, v, sinks=s), q, k, v, sinks
  )
  grads = pullback((dout, dlse, jnp.zeros_like(max_logit)))
  expected = oracle.attention_with_sinks(
    q,
    k,
    v,
    dout,
    dlse,
    sinks=np.asarray(sinks),
    scale=d**-0.5,
    softcap=softcap,
    window=(window[0], 0 if causal else window[1]),
    diagonal_offset=sk - sq,
  )
  names = ("out", "lse", "dq", "dk", "dv", "dsinks", "max_logit")
  for name, actual, want in zip(names, (out, lse, *grads, max_logit), expected):
    _check(name, actual, want, jnp.bfloat16, ulps=1)
  assert grads[3].dtype == jnp.float32 and max_logit.shape == (batch, heads)


def test_keyless_rows_get_the_sink_as_lse_and_no_gradient(normal):
  q, k, v = normal((2, 40, 4, 64)), normal((2, 16, 2, 64)), normal((2, 16, 2, 64))
  sinks = jnp.array([0.5, -3.0, 2.0, 0.0], jnp.float32)
  dout = normal((2, 40, 4, 64))
  (out, lse), pullback = jax.vjp(
    lambda q, s: jax_fa3.flash_attention(q, k, v, causal=True, sinks=s, return_lse=True), q, sinks
  )
  dq, dsinks = pullback((dout, jnp.zeros_like(lse)))
  empty = slice(0, 40 - 16)
  assert (out[:, empty] == 0).all()
  np.testing.assert_array_equal(
    lse[:, :, empty], jnp.broadcast_to(sinks[None, :, None], (2, 4, 24))
  )
  assert (dq[:, empty] == 0).all() and jnp.isfinite(dsinks).all()


def test_float32_reference_with_sinks_and_seqused(normal):
  """The contract's rule: a used row that sees no key has lse = its sink; rows past
  seqused_q are no rows and keep -inf."""
  q, k, v = (
    normal(shape, jnp.float32) for shape in ((3, 50, 4, 64), (3, 70, 2, 64), (3, 70, 2, 64))
  )
  dout = normal((3, 50, 4, 64), jnp.float32)
  sinks = normal((4,), jnp.float32)
  seqused_q, seqused_k = jnp.array([50, 17, 0], jnp.int32), jnp.array([70, 0, 33], jnp.int32)
  params = dict(softmax_scale=0.125, softcap=0.0, window_left=9, window_right=0, diagonal_offset=20)
  absent = jnp.zeros((0,), jnp.int32)
  sinks_bh = jnp.broadcast_to(sinks, (3, 4))
  out, lse, max_logit = reference.attention_fwd(
    q, k, v, seqused_q, seqused_k, absent, absent, sinks_bh, return_max_logit=True, **params
  )
  dq, dk, dv, dsinks = reference.attention_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    seqused_q,
    seqused_k,
    absent,
    absent,
    sinks_bh,
    **params,
    deterministic=False,
  )
  expected = oracle.attention_with_sinks(
    q,
    k,
    v,
    dout,
    sinks=np.asarray(sinks),
    scale=0.125,
    window=(9, 0),
    diagonal_offset=20,
    seqused_q=np.asarray(seqused_q),
    seqused_k=np.asarray(seqused_k),
  )
  assert (lse[2] == -jnp.inf).all() and (lse[1, :, 17:] == -jnp.inf).all()
  np.testing.assert_array_equal(lse[1, :, :17], jnp.broadcast_to(sinks[:, None], (4, 17)))
  for name, actual, want in zip(
    ("out", "lse", "dq", "dk", "dv", "dsinks", "max_logit"),
    (out, lse, dq, dk, dv, dsinks.sum(0), max_logit),
    expected,
  ):
    _check(name, actual, want, jnp.float32, ulps=64)


def test_packed_sequences_with_sinks(normal):
  """Segment ids and sinks: each document with the sink, as if run alone."""
  q, k, v = normal((1, 60, 4, 32)), normal((1, 60, 2, 32)), normal((1, 60, 2, 32))
  sinks = normal((4,), jnp.float32)
  ids = jnp.array([[0] * 25 + [1] * 30 + [-1] * 5], jnp.int32)
  out, lse = jax_fa3.flash_attention(
    q, k, v, segment_ids=ids, causal=True, sinks=sinks, return_lse=True
  )
  for a, b in ((0, 25), (25, 55)):
    o, l = jax_fa3.flash_attention(
      q[:, a:b], k[:, a:b], v[:, a:b], causal=True, sinks=sinks, return_lse=True
    )
    np.testing.assert_allclose(
      np.asarray(out[:, a:b], np.float32), np.asarray(o, np.float32), atol=1e-2
    )
    np.testing.assert_allclose(lse[:, :, a:b], l, atol=1e-5)
  # Padding tokens see no key: output 0, lse = the sink.
  assert (out[:, 55:] == 0).all()
  np.testing.assert_array_equal(lse[:, :, 55:], jnp.broadcast_to(sinks[None, :, None], (1, 4, 5)))


def test_sinks_and_max_logit_under_vmap_and_jit(normal):
  q, k, v = normal((3, 2, 20, 4, 32)), normal((3, 2, 20, 2, 32)), normal((3, 2, 20, 2, 32))
  sinks = normal((3, 4), jnp.float32)  # a different set of sinks per mapped element
  fn = lambda q, k, v, s: jax_fa3.flash_attention(
    q, k, v, causal=True, sinks=s, return_max_logit=True
  )
  out, max_logit = jax.jit(jax.vmap(fn))(q, k, v, sinks)
  grad = jax.jit(
    jax.vmap(jax.grad(lambda q, k, v, s: fn(q, k, v, s)[0].astype(jnp.float32).sum(), argnums=3))
  )(q, k, v, sinks)
  for i in range(3):
    o, m = fn(q[i], k[i], v[i], sinks[i])
    g = jax.grad(lambda s: fn(q[i], k[i], v[i], s)[0].astype(jnp.float32).sum())(sinks[i])
    np.testing.assert_array_equal(out[i], o)
    np.testing.assert_array_equal(max_logit[i], m)
    np.testing.assert_allclose(grad[i], g, rtol=1e-2, atol=1e-2)  # jit vs eager float order


def test_max_logit_is_minus_inf_where_nothing_is_seen(normal):
  q, k, v = normal((2, 8, 2, 16)), normal((2, 8, 2, 16)), normal((2, 8, 2, 16))
  ids = jnp.array([[-1] * 8, [0] * 8], jnp.int32)
  _, max_logit = jax_fa3.flash_attention(q, k, v, segment_ids=ids, return_max_logit=True)
  assert (max_logit[0] == -jnp.inf).all() and jnp.isfinite(max_logit[1]).all()


def test_varlen_returns_a_max_logit_per_head(normal):
  q, k, v = normal((30, 4, 32)), normal((30, 2, 32)), normal((30, 2, 32))
  cu = jnp.array([0, 10, 30], jnp.int32)
  out, max_logit = jax_fa3.flash_attention_varlen(
    q, k, v, cu, cu, causal=True, sinks=jnp.zeros(4), return_max_logit=True
  )
  assert out.shape == q.shape and max_logit.shape == (4,)


@pytest.mark.parametrize(
  "sinks, message",
  [
    (jnp.zeros((3,)), r"sinks must be a float array of shape \[heads\] = \[4\]"),
    (jnp.zeros((2, 4)), r"sinks must be a float array of shape \[heads\]"),
    (jnp.zeros((4,), jnp.int32), r"sinks must be a float array"),
  ],
)
def test_bad_sinks_are_refused_naming_the_argument(sinks, message, normal):
  q = normal((1, 8, 4, 16))
  with pytest.raises(ValueError, match=message):
    jax_fa3.flash_attention(q, q, q, sinks=sinks)


def test_return_max_logit_must_be_static(normal):
  q = normal((1, 8, 2, 16))
  with pytest.raises(TypeError, match="return_max_logit must be static"):
    jax.jit(lambda q, flag: jax_fa3.flash_attention(q, q, q, return_max_logit=flag))(q, True)
