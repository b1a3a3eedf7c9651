"""Packed sequences on the GPU: `flash_attention(segment_ids=...)` and
`flash_attention_varlen` against a float32 oracle with the dense mask built here, from the
ids and positions alone (not from jax_fa3/segments.py), under FlashAttention's accuracy
rule. Outputs are NaN-poisoned before each launch (conftest.py)."""

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


def _mask(q_ids, kv_ids, window, diagonal_offset):
  """[B, 1, Sq, Sk]: same id, id >= 0, and the window around i + diagonal_offset."""
  sq, sk = q_ids.shape[1], kv_ids.shape[1]
  i = np.arange(sq)[:, None] + diagonal_offset
  j = np.arange(sk)[None, :]
  ok = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
  if window[0] >= 0:
    ok &= (j >= i - window[0])[None]
  if window[1] >= 0:
    ok &= (j <= i + window[1])[None]
  return jnp.asarray(ok[:, None])


def _attention(q, k, v, mask, scale, softcap, dtype):
  """Attention in `dtype` (float32: the oracle; the input dtype: the baseline), (out, lse)."""
  heads, kv_heads = q.shape[2], k.shape[2]
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(
    scale, dtype
  )
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum(
    "bhqk,bkhd->bqhd",
    (p / jnp.where(l > 0, l, 1)).astype(dtype),
    v,
    precision=jax.lax.Precision.HIGHEST,
  )
  lse = jnp.where(
    l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1)) + m[..., 0], -jnp.inf
  )
  return out, lse.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Case:
  head_dim: int = 128
  seqlen_q: int = 1500
  seqlen_k: int | None = None  # None: seqlen_q, one set of ids
  heads: int = 4
  kv_heads: int = 2
  mean_doc: int = 200
  pad: int = 0
  causal: bool = False
  window: tuple = (-1, -1)
  softcap: float = 0.0
  recurring: bool = False  # ids that come back non-contiguously
  dtype: str = "bfloat16"
  batch: int = 2

  def __str__(self):
    fields = [
      f"d{self.head_dim}",
      f"q{self.seqlen_q}",
      f"k{self.seqlen_k or self.seqlen_q}",
      f"h{self.heads}_{self.kv_heads}",
      f"doc{self.mean_doc}",
      self.dtype,
    ]
    fields += [
      name
      for name, on in (
        ("causal", self.causal),
        ("recurring", self.recurring),
        (f"pad{self.pad}", self.pad),
        (f"softcap{self.softcap}", self.softcap),
        (f"window{self.window}", self.window != (-1, -1)),
      )
      if on
    ]
    return "-".join(fields)


CASES = [
  Case(),
  Case(causal=True),
  Case(head_dim=64, causal=True, mean_doc=100, pad=37),
  Case(head_dim=256, seqlen_q=900, mean_doc=300, causal=True, pad=5),
  Case(head_dim=256, seqlen_q=700, mean_doc=80),
  Case(head_dim=96, seqlen_q=1000, causal=True),  # forward pads to 96, backward to 128
  Case(heads=8, kv_heads=1, causal=True, window=(64, 0), mean_doc=300),
  Case(window=(50, 50), mean_doc=150),
  Case(recurring=True),
  Case(recurring=True, causal=True, head_dim=64),
  Case(seqlen_q=777, seqlen_k=1333, causal=True),  # cross attention, kv ids of their own
  Case(seqlen_q=1333, seqlen_k=500, mean_doc=120),
  Case(softcap=30.0, causal=True),
  # The packed backward's softcap kernels where it is compiled in (bwd/config.h)
  Case(head_dim=64, softcap=20.0, mean_doc=150),
  Case(head_dim=256, seqlen_q=700, softcap=30.0, causal=True, pad=11),
  Case(dtype="float16", causal=True, pad=100),
  Case(seqlen_q=8192, heads=4, kv_heads=4, mean_doc=512, causal=True, batch=2),  # >> SMs tiles
  Case(seqlen_q=3000, mean_doc=3000, causal=True),  # one long document: unmasked tiles
]


def _ids(case, rng):
  sq, sk = case.seqlen_q, case.seqlen_k or case.seqlen_q
  q_ids = np.stack([random_documents(rng, sq, case.mean_doc, case.pad) for _ in range(case.batch)])
  if case.recurring:  # a few tokens of each row moved to another document
    for row in q_ids:
      spots = rng.choice(sq, size=sq // 10, replace=False)
      row[spots] = rng.integers(0, row.max() + 1, size=spots.size)
  if case.seqlen_k is None:
    return q_ids, None, q_ids
  # Cross attention: the same documents, stretched to the keys' length; a document with
  # no keys leaves its queries key-less.
  kv_ids = np.stack([row[np.arange(sk) * sq // sk] for row in q_ids])
  return q_ids, kv_ids, kv_ids


def _inputs(case, seed):
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(case.dtype)
  sq, sk = case.seqlen_q, case.seqlen_k or case.seqlen_q
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  q = draw(case.batch, sq, case.heads, case.head_dim)
  k = draw(case.batch, sk, case.kv_heads, case.head_dim)
  v = draw(case.batch, sk, case.kv_heads, case.head_dim)
  dout = draw(case.batch, sq, case.heads, case.head_dim)
  return (q, k, v, dout, *_ids(case, rng))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_segment_ids_forward_and_gradients(case):
  q, k, v, dout, q_ids, kv_arg, kv_ids = _inputs(case, zlib.crc32(str(case).encode()))
  scale = 1 / math.sqrt(case.head_dim)
  window = (case.window[0], 0) if case.causal else case.window
  offset = kv_ids.shape[1] - q_ids.shape[1]
  mask = _mask(q_ids, kv_ids, window, offset)

  def ours(q, k, v):
    return jax_fa3.flash_attention(
      q,
      k,
      v,
      segment_ids=q_ids,
      kv_segment_ids=kv_arg,
      causal=case.causal,
      window_size=case.window,
      softcap=case.softcap,
      return_lse=True,
    )

  f = jax.jit(
    lambda q, k, v, dout: (ours(q, k, v), jax.vjp(lambda *x: ours(*x)[0], q, k, v)[1](dout))
  )
  text = f.lower(q, k, v, dout).as_text()
  assert "jax_fa3_fwd" in text and "jax_fa3_bwd" in text
  (out, lse), grads = f(q, k, v, dout)

  def reference(dtype):
    run = lambda q, k, v: _attention(q, k, v, mask, scale, case.softcap, dtype)
    (o, l), pullback = jax.vjp(run, q, k, v)
    return o, l, pullback((dout.astype(dtype), jnp.zeros_like(l)))

  ref_out, ref_lse, ref_grads = jax.jit(lambda: reference(jnp.float32))()
  base_out, _, base_grads = jax.jit(lambda: reference(q.dtype))()
  assert_accurate("out", out, ref_out, base_out)
  ref_lse = np.asarray(ref_lse)
  lse = np.asarray(lse)
  seen = np.isfinite(ref_lse)
  np.testing.assert_allclose(lse[seen], ref_lse[seen], atol=2e-3, rtol=1e-4)
  assert np.all(lse[~seen] == -np.inf), "key-less rows must have lse -inf"
  keyless = np.broadcast_to(~seen.transpose(0, 2, 1)[..., None], out.shape)
  assert np.all(np.asarray(out)[keyless] == 0), "key-less rows must have output 0"
  for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert_accurate(name, g, r, b)


def test_segment_ids_padding_rows_pass_no_gradient():
  case = Case(head_dim=64, seqlen_q=600, pad=200, causal=True)
  q, k, v, dout, q_ids, _, _ = _inputs(case, 5)
  loss = lambda q, k, v: jnp.sum(
    jax_fa3.flash_attention(q, k, v, segment_ids=q_ids, causal=True).astype(jnp.float32)
    * dout.astype(jnp.float32)
  )
  dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g in (dq, dk, dv):
    assert np.all(np.asarray(g, np.float32)[:, -200:] == 0)
    assert not np.isnan(np.asarray(g, np.float32)).any()


@pytest.mark.parametrize(
  "case",
  [
    Case(causal=True),
    Case(recurring=True, head_dim=64),
    Case(head_dim=256, seqlen_q=900, causal=True),
  ],
  ids=str,
)
def test_segment_ids_deterministic_is_bitwise_reproducible(case):
  q, k, v, dout, q_ids, _, _ = _inputs(case, 9)
  grad = jax.jit(
    jax.grad(
      lambda q, k, v: jnp.sum(
        jax_fa3.flash_attention(
          q, k, v, segment_ids=q_ids, causal=case.causal, deterministic=True
        ).astype(jnp.float32)
        * dout.astype(jnp.float32)
      ),
      argnums=(0, 1, 2),
    )
  )
  first = [np.asarray(x) for x in grad(q, k, v)]
  for _ in range(3):
    for a, b in zip(first, grad(q, k, v)):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_segment_ids_under_vmap():
  case = Case(head_dim=64, seqlen_q=500, mean_doc=90, causal=True, batch=2)
  q, k, v, _, q_ids, _, _ = _inputs(case, 13)
  stack = lambda x: jnp.stack([x, x[::-1]])
  f = jax.vmap(lambda q, k, v, ids: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True))
  out = jax.jit(f)(stack(q), stack(k), stack(v), stack(jnp.asarray(q_ids)))
  for i in range(2):
    expected = jax_fa3.flash_attention(
      stack(q)[i], stack(k)[i], stack(v)[i], segment_ids=stack(jnp.asarray(q_ids))[i], causal=True
    )
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(expected))


# --- varlen -----------------------------------------------------------------------


def _varlen_oracle_mask(cu_q, cu_k, total_q, total_k, window):
  """[1, 1, total_q, total_k]: same sequence, window around the bottom-right diagonal."""
  ok = np.zeros((total_q, total_k), bool)
  for s in range(len(cu_q) - 1):
    lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
    a = np.arange(lq)[:, None] + lk - lq
    b = np.arange(lk)[None, :]
    block = np.ones((lq, lk), bool)
    if window[0] >= 0:
      block &= b >= a - window[0]
    if window[1] >= 0:
      block &= b <= a + window[1]
    ok[cu_q[s] : cu_q[s + 1], cu_k[s] : cu_k[s + 1]] = block
  return jnp.asarray(ok[None, None])


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_oracle(head_dim, causal):
  rng = np.random.default_rng(head_dim + causal)
  lengths_q = np.array([300, 0, 517, 1, 129, 700, 0], np.int32)
  lengths_k = np.array([300, 64, 900, 5, 0, 650, 0], np.int32)
  cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
  cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
  total_q, total_k = int(cu_q[-1]) + 11, int(cu_k[-1])  # 11 tokens past the last sequence
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
  q, k, v, dout = (
    draw(total_q, 8, head_dim),
    draw(total_k, 2, head_dim),
    draw(total_k, 2, head_dim),
    draw(total_q, 8, head_dim),
  )

  def ours(q, k, v):
    return jax_fa3.flash_attention_varlen(
      q, k, v, cu_q, cu_k, max_seqlen_q=700, max_seqlen_k=900, causal=causal, return_lse=True
    )

  out, lse = jax.jit(ours)(q, k, v)
  # The gradients without the lse's (which would widen v by a column, past the kernels).
  _, pullback = jax.vjp(lambda *x: ours(*x)[0], q, k, v)
  grads = jax.jit(pullback)(dout)
  mask = _varlen_oracle_mask(cu_q, cu_k, total_q, total_k, (-1, 0) if causal else (-1, -1))

  def reference(dtype):
    run = lambda q, k, v: _attention(q[None], k[None], v[None], mask, head_dim**-0.5, 0.0, dtype)[
      0
    ][0]
    o, pull = jax.vjp(run, q, k, v)
    return o, pull(dout.astype(dtype))

  ref_out, ref_grads = jax.jit(lambda: reference(jnp.float32))()
  base_out, base_grads = jax.jit(lambda: reference(jnp.bfloat16))()
  assert_accurate("out", out, ref_out, base_out)
  for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
    assert_accurate(name, g, r, b)
  assert lse.shape == (8, total_q)
  assert np.all(np.asarray(out, np.float32)[cu_q[-1] :] == 0)


def test_varlen_malformed_sequences_give_nan_only_there():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((400, 4, 128)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((300, 4, 128)), jnp.bfloat16)
  cu_q = np.array([0, 100, 250, 200, 400], np.int32)  # sequence 2 runs backwards
  cu_k = np.array([0, 100, 200, 250, 900], np.int32)  # sequence 3 passes the end
  out = np.asarray(
    jax.jit(lambda q, k: jax_fa3.flash_attention_varlen(q, k, k, cu_q, cu_k))(q, k), np.float32
  )
  nan_rows = np.isnan(out).any(axis=(1, 2))
  assert not nan_rows[:200].any()
  assert nan_rows[200:400].all()
