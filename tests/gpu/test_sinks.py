"""Attention sinks and the per-head max logit on the GPU: `flash_attention(sinks=...,
return_max_logit=True)` against a float32 oracle written here from the definition (the sink
is one more logit in every row's softmax, with no value), under FlashAttention's accuracy
rule: the kernel's error is at most twice that of the same computation in the input dtype.
Outputs are NaN-poisoned before each launch (conftest.py)."""

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
from documents import random_documents
from kernel_ffi import assert_accurate


def _mask(case, q_ids=None):
  """[B, 1, Sq, Sk] bool: the window around i + seqlen_k - seqlen_q, and same document."""
  sq, sk = case.seqlen_q, case.seqlen_k
  i = np.arange(sq)[:, None] + sk - sq
  j = np.arange(sk)[None, :]
  left, right = case.window[0], 0 if case.causal else case.window[1]
  ok = np.ones((sq, sk), bool)
  if left >= 0:
    ok &= j >= i - left
  if right >= 0:
    ok &= j <= i + right
  ok = np.broadcast_to(ok, (case.batch, sq, sk))
  if q_ids is not None:
    ok = ok & (q_ids[:, :, None] == q_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
  return jnp.asarray(ok[:, None])


def _attention(q, k, v, sinks, mask, scale, softcap, dtype):
  """(out, lse, max_logit) in `dtype` (float32: the oracle; the input dtype: the baseline),
  with the sink as one more logit of every row."""
  heads, kv_heads = q.shape[2], k.shape[2]
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(
    scale, dtype
  )
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask, s, -jnp.inf).astype(jnp.float32)
  max_logit = jnp.max(s, axis=(2, 3))
  sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (*s.shape[:3], 1))
  lse = jax.nn.logsumexp(jnp.concatenate([s, sink], axis=-1), axis=-1)
  p = jnp.exp(s - lse[..., None])
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(dtype), v, precision=jax.lax.Precision.HIGHEST)
  return out, lse, jax.lax.stop_gradient(max_logit)


@dataclasses.dataclass(frozen=True)
class Case:
  head_dim: int = 128
  seqlen_q: int = 1000
  seqlen_k: int = 1000
  heads: int = 4
  kv_heads: int = 2
  causal: bool = False
  window: tuple = (-1, -1)
  softcap: float = 0.0
  sink_scale: float = 1.0  # sinks ~ N(0, 1) * this: large ones dominate the rows
  packed: bool = False  # segment ids, documents of ~200 tokens and 50 padding tokens
  dlse: bool = False  # the lse is differentiated too
  deterministic: bool = False
  dtype: str = "bfloat16"
  batch: int = 2

  def __str__(self):
    fields = [
      f"d{self.head_dim}",
      f"q{self.seqlen_q}",
      f"k{self.seqlen_k}",
      f"h{self.heads}_{self.kv_heads}",
      self.dtype,
    ]
    fields += [
      name
      for name, on in (
        ("causal", self.causal),
        (f"window{self.window}", self.window != (-1, -1)),
        (f"softcap{self.softcap}", self.softcap),
        (f"sinks*{self.sink_scale}", self.sink_scale != 1),
        ("packed", self.packed),
        ("dlse", self.dlse),
        ("deterministic", self.deterministic),
      )
      if on
    ]
    return "-".join(fields)


CASES = [
  Case(head_dim=64, heads=16, kv_heads=2, causal=True, window=(128, 0)),  # gpt-oss's sliding layers
  Case(head_dim=64, heads=16, kv_heads=2, causal=True),  # and its full ones (8:1)
  Case(),
  Case(causal=True, seqlen_q=1300, seqlen_k=700),  # seqlen_q > seqlen_k: key-less rows
  Case(causal=True, seqlen_q=333, seqlen_k=1777, dlse=True),
  Case(window=(50, 50), softcap=30.0),
  Case(head_dim=256, causal=True, seqlen_q=900, seqlen_k=900),
  Case(head_dim=96, causal=True, seqlen_q=555, seqlen_k=555),  # padded head dims
  Case(sink_scale=8.0, causal=True),  # sinks that outweigh the keys
  Case(packed=True, causal=True, heads=8, kv_heads=1),
  Case(causal=True, deterministic=True, dtype="float16"),
]


def _inputs(case, seed):
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(case.dtype)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  q = draw(case.batch, case.seqlen_q, case.heads, case.head_dim)
  k = draw(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
  v = draw(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
  dout = draw(case.batch, case.seqlen_q, case.heads, case.head_dim)
  dlse = jnp.asarray(rng.standard_normal((case.batch, case.heads, case.seqlen_q), np.float32))
  sinks = jnp.asarray(rng.standard_normal(case.heads, np.float32) * case.sink_scale)
  q_ids = None
  if case.packed:
    q_ids = np.stack([random_documents(rng, case.seqlen_q, 200, pad=50) for _ in range(case.batch)])
  return q, k, v, dout, dlse, sinks, q_ids


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sinks_forward_gradients_and_max_logit(case):
  q, k, v, dout, dlse, sinks, q_ids = _inputs(case, zlib.crc32(str(case).encode()))
  scale = 1 / math.sqrt(case.head_dim)
  mask = _mask(case, q_ids)

  def ours(q, k, v, sinks):
    return jax_fa3.flash_attention(
      q,
      k,
      v,
      segment_ids=q_ids,
      causal=case.causal,
      window_size=case.window,
      softcap=case.softcap,
      sinks=sinks,
      return_lse=True,
      return_max_logit=True,
      deterministic=case.deterministic,
    )

  def run(q, k, v, sinks):
    out, lse, max_logit = ours(q, k, v, sinks)
    if case.dlse:
      _, pullback = jax.vjp(lambda *a: ours(*a)[:2], q, k, v, sinks)
      return out, lse, max_logit, pullback((dout, dlse))
    # Without an lse cotangent, the output alone: the lse's gradient widens v by a column.
    _, pullback = jax.vjp(lambda *a: ours(*a)[0], q, k, v, sinks)
    return out, lse, max_logit, pullback(dout)

  f = jax.jit(run)
  text = f.lower(q, k, v, sinks).as_text()
  assert "jax_fa3_fwd" in text and "jax_fa3_bwd" in text
  out, lse, max_logit, grads = f(q, k, v, sinks)

  def reference(dtype):
    fn = lambda q, k, v, sinks: _attention(q, k, v, sinks, mask, scale, case.softcap, dtype)
    (o, l, m), pullback = jax.vjp(fn, q, k, v, sinks)
    return (
      o,
      l,
      m,
      pullback((dout.astype(dtype), dlse if case.dlse else jnp.zeros_like(l), jnp.zeros_like(m))),
    )

  ref_out, ref_lse, ref_max, ref_grads = jax.jit(lambda: reference(jnp.float32))()
  base_out, _, _, base_grads = jax.jit(lambda: reference(q.dtype))()
  assert_accurate("out", out, ref_out, base_out)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-3, rtol=1e-4)
  # Key-less rows, padding (negative ids) included: lse = the sink.
  keyless = np.broadcast_to(~np.asarray(mask).any(axis=-1), lse.shape)
  assert np.all(
    lse[keyless] == np.broadcast_to(np.asarray(sinks)[None, :, None], lse.shape)[keyless]
  ), "key-less rows must have lse = their sink"
  rows_out = np.broadcast_to(keyless.transpose(0, 2, 1)[..., None], out.shape)
  assert np.all(np.asarray(out)[rows_out] == 0), "key-less rows must have output 0"
  np.testing.assert_allclose(np.asarray(max_logit), np.asarray(ref_max), atol=2e-3, rtol=1e-3)
  for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert_accurate(name, g, r, b)
  # dsinks = -sum_i exp(sink - lse_i) rowsum(dout_i * out_i) reads the output as stored, in
  # the input dtype (as the backward's rowsum does for dq and dk). The float32 oracle's
  # gradient does not round it, so that rounding's effect on the sum is allowed on top.
  sink_weight = jnp.exp(sinks[None, :, None] - ref_lse)
  rounding = ref_out - ref_out.astype(q.dtype).astype(jnp.float32)
  rowsum = jnp.sum(dout.astype(jnp.float32) * rounding, axis=-1).transpose(0, 2, 1)
  out_rounding = float(jnp.max(jnp.sum(sink_weight * jnp.abs(rowsum), axis=(0, 2))))
  err = float(np.max(np.abs(np.asarray(grads[3]) - np.asarray(ref_grads[3]))))
  base_err = float(np.max(np.abs(np.asarray(base_grads[3]) - np.asarray(ref_grads[3]))))
  assert err <= 2 * base_err + out_rounding + 1e-5, (
    f"dsinks: error {err} > 2 * {base_err} + {out_rounding} (the output's rounding) + 1e-5"
  )
  assert grads[3].dtype == jnp.float32
  # And exactly the formula, from the kernel's own output and lse (the lse's share added).
  own_lse = jnp.asarray(lse)
  own_weight = jnp.where(jnp.isinf(own_lse), 0.0, jnp.exp(sinks[None, :, None] - own_lse))
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  formula = -jnp.sum(own_weight * (delta - (dlse if case.dlse else 0.0)), axis=(0, 2))
  np.testing.assert_allclose(
    np.asarray(grads[3]),
    np.asarray(formula),
    rtol=1e-4,
    atol=1e-4 * float(jnp.max(jnp.abs(formula))),
  )


def test_sinks_deterministic_is_bitwise_reproducible():
  case = Case(head_dim=64, causal=True, heads=8, kv_heads=2)
  q, k, v, dout, _, sinks, _ = _inputs(case, 3)
  grad = jax.jit(
    jax.grad(
      lambda q, k, v, s: jnp.sum(
        jax_fa3.flash_attention(q, k, v, causal=True, sinks=s, deterministic=True).astype(
          jnp.float32
        )
        * dout.astype(jnp.float32)
      ),
      argnums=(0, 1, 2, 3),
    )
  )
  first = [np.asarray(x) for x in grad(q, k, v, sinks)]
  for _ in range(3):
    for a, b in zip(first, grad(q, k, v, sinks)):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_without_sinks_lse_and_output_are_unchanged_by_the_sink_path():
  """sinks = -inf everywhere is no sink at all: the same results as without sinks."""
  case = Case(causal=True)
  q, k, v, _, _, _, _ = _inputs(case, 4)
  plain = jax.jit(lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=True, return_lse=True))(
    q, k, v
  )
  none = jnp.full((case.heads,), -jnp.inf, jnp.float32)
  with_none = jax.jit(
    lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=True, sinks=none, return_lse=True)
  )(q, k, v)
  for a, b in zip(plain, with_none):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6
    )


def test_varlen_with_sinks_matches_per_sequence_calls():
  rng = np.random.default_rng(7)
  lengths = [300, 1, 777, 0, 129]
  cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
  total, heads, d = int(cu[-1]), 8, 64
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
  q, k, v = draw(total, heads, d), draw(total, 2, d), draw(total, 2, d)
  sinks = jnp.asarray(rng.standard_normal(heads, np.float32))
  out, lse, max_logit = jax.jit(
    lambda q, k, v: jax_fa3.flash_attention_varlen(
      q, k, v, cu, cu, causal=True, sinks=sinks, return_lse=True, return_max_logit=True
    )
  )(q, k, v)
  per_max = []
  for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
    if a == b:
      continue
    o, l, m = jax_fa3.flash_attention(
      q[None, a:b],
      k[None, a:b],
      v[None, a:b],
      causal=True,
      sinks=sinks,
      return_lse=True,
      return_max_logit=True,
    )
    np.testing.assert_allclose(
      np.asarray(out[a:b], np.float32), np.asarray(o[0], np.float32), atol=1e-2
    )
    np.testing.assert_allclose(np.asarray(lse[:, a:b]), np.asarray(l[0]), atol=1e-3)
    per_max.append(np.asarray(m[0]))
  np.testing.assert_allclose(np.asarray(max_logit), np.max(per_max, axis=0), atol=1e-3)
