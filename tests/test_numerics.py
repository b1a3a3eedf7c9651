"""flash_attention's outputs and gradients against the float64 oracle."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from jax_fa3 import flash_attention, reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
import kernel_ffi  # noqa: E402  (the GPU tests' float32 oracle; importing it needs no GPU)

pytestmark = pytest.mark.usefixtures("on_cpu")


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  seqlen_q: int
  seqlen_k: int
  heads: int
  kv_heads: int
  head_dim: int
  head_dim_v: int | None = None
  causal: bool = False
  window: tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  scale: float | None = None
  dtype: str = "bfloat16"

  def __str__(self):
    defaults = Case(*dataclasses.astuple(self)[:6])
    extras = [
      f"{f.name}={getattr(self, f.name)}".replace(" ", "")
      for f in dataclasses.fields(self)[6:]
      if getattr(self, f.name) != getattr(defaults, f.name)
    ]
    return "-".join(
      [
        f"b{self.batch}q{self.seqlen_q}k{self.seqlen_k}h{self.heads}"
        f"kv{self.kv_heads}d{self.head_dim}",
        *extras,
      ]
    )


F16 = "float16"
CASES = [
  Case(2, 1, 1, 2, 1, 64),
  Case(2, 1, 113, 4, 2, 64, causal=True),  # decode
  Case(1, 1, 1000, 8, 1, 128, causal=True, dtype=F16),  # decode, MQA
  Case(1, 7, 7, 8, 1, 32),  # MQA
  Case(2, 7, 7, 4, 4, 64, causal=True, dtype=F16),
  Case(2, 7, 113, 8, 8, 64, causal=True),  # Sq < Sk
  Case(2, 113, 7, 4, 4, 64, causal=True, dtype=F16),  # Sq > Sk: empty rows
  Case(1, 113, 113, 16, 2, 128),  # GQA 8
  Case(1, 113, 113, 4, 2, 96, softcap=30.0),
  Case(1, 113, 1000, 2, 1, 80, window=(64, 16)),
  Case(1, 1000, 113, 2, 2, 32, window=(10, 10), dtype=F16),  # empty rows
  Case(1, 1000, 1000, 2, 1, 64, causal=True),
  Case(1, 1000, 1000, 2, 2, 64, window=(100, 0), softcap=5.0, dtype=F16),
  Case(2, 7, 113, 2, 1, 192, 128),  # head_dim_v != head_dim
  Case(2, 113, 7, 2, 2, 64, 128, dtype=F16),
  Case(1, 113, 113, 2, 2, 256, causal=True),
  Case(1, 7, 1000, 4, 2, 256, window=(0, 0)),
  Case(2, 113, 113, 8, 4, 64, window=(-1, 5), dtype=F16),  # right bound only
  Case(2, 113, 113, 8, 4, 64, window=(5, -1)),  # left bound only
  Case(1, 113, 113, 4, 4, 64, causal=True, window=(20, 7)),  # causal overrides right
  Case(3, 7, 7, 2, 1, 16, scale=0.5),
  Case(1, 113, 1, 2, 1, 64),
  Case(1, 113, 1, 2, 1, 64, causal=True, dtype=F16),  # only the last row sees
  Case(2, 1, 7, 2, 2, 64, window=(0, 0)),
  Case(1, 7, 113, 8, 2, 128, softcap=2.0, dtype=F16),
  Case(1, 113, 7, 16, 8, 32, causal=True, window=(3, -1)),
  Case(2, 113, 113, 2, 1, 128, scale=1.0, dtype=F16),
  Case(1, 1000, 7, 2, 2, 64, dtype=F16),
  Case(1, 7, 1000, 2, 1, 64, window=(500, 500)),
  Case(1, 113, 113, 4, 1, 40, 24),
  Case(2, 113, 113, 2, 2, 64, window=(0, 0), dtype=F16),
  Case(1, 7, 7, 2, 2, 256, 64, softcap=10.0),
]


def _inputs(case, normal):
  dtype = jnp.dtype(case.dtype)
  head_dim_v = case.head_dim_v or case.head_dim
  q = normal((case.batch, case.seqlen_q, case.heads, case.head_dim), dtype)
  k = normal((case.batch, case.seqlen_k, case.kv_heads, case.head_dim), dtype)
  v = normal((case.batch, case.seqlen_k, case.kv_heads, head_dim_v), dtype)
  dout = normal((case.batch, case.seqlen_q, case.heads, head_dim_v), dtype)
  dlse = normal((case.batch, case.heads, case.seqlen_q), jnp.float32)
  return q, k, v, dout, dlse


def _expected(case, q, k, v, dout, dlse):
  return oracle.attention(
    q,
    k,
    v,
    dout,
    dlse,
    scale=case.scale or case.head_dim**-0.5,
    softcap=case.softcap,
    window=(case.window[0], 0 if case.causal else case.window[1]),
    diagonal_offset=case.seqlen_k - case.seqlen_q,
  )


def _check(record_error, dtype, name, actual, expected, ulps):
  """max|actual - expected| <= ulps * eps(dtype) * max|expected|, with -inf where expected has it."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  finite = np.isfinite(expected)
  np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=name)
  assert np.isfinite(actual[finite]).all(), f"{name} has non-finite values"
  error = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
  oracle_max = np.abs(expected[finite]).max(initial=0.0)
  record_error(dtype, name, error, oracle_max)
  bound = ulps * float(jnp.finfo(dtype).eps) * oracle_max + 1e-5
  assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle(case, normal, record_error):
  """Outputs, lse and gradients agree with the oracle to within one rounding of the result.

  Every other case also passes a cotangent for the lse.
  """
  q, k, v, dout, dlse = _inputs(case, normal)
  with_lse = CASES.index(case) % 2 == 0
  kwargs = dict(
    softmax_scale=case.scale, causal=case.causal, window_size=case.window, softcap=case.softcap
  )
  out, lse = flash_attention(q, k, v, **kwargs, return_lse=True)
  if with_lse:
    _, pullback = jax.vjp(lambda *a: flash_attention(*a, **kwargs, return_lse=True), q, k, v)
    grads = pullback((dout, dlse))
  else:
    _, pullback = jax.vjp(lambda *a: flash_attention(*a, **kwargs), q, k, v)
    grads = pullback(dout)
  expected = _expected(case, q, k, v, dout, dlse if with_lse else None)
  for name, actual, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected):
    _check(record_error, case.dtype, name, actual, want, ulps=1)


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_float32_reference_matches_oracle(case, normal, record_error):
  """The float32 reference (the path off the GPU, and where no kernel is compiled) is tight.
  The GPU tests judge the kernels by kernel_ffi's float32 oracle, checked below."""
  q, k, v, dout, dlse = (x.astype(jnp.float32) for x in _inputs(case, normal))
  params = dict(
    softmax_scale=case.scale or case.head_dim**-0.5,
    softcap=case.softcap,
    window_left=case.window[0],
    window_right=0 if case.causal else case.window[1],
    diagonal_offset=case.seqlen_k - case.seqlen_q,
  )
  absent = jnp.zeros((0,), jnp.int32)
  out, lse = reference.attention_fwd(q, k, v, absent, absent, absent, absent, absent, **params)
  grads = reference.attention_bwd(
    dout, q, k, v, out, lse, absent, absent, absent, absent, absent, **params, deterministic=False
  )
  expected = _expected(case, q, k, v, dout, None)
  for name, actual, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected):
    _check(record_error, jnp.float32, name, actual, want, ulps=64)


def test_rows_that_see_no_key(normal):
  """Causal with seqlen_q > seqlen_k: the first rows see nothing. Output 0, lse -inf, no
  gradient through them, and no NaN anywhere, even with an lse cotangent on those rows."""
  q, k, v = normal((2, 40, 4, 64)), normal((2, 16, 2, 64)), normal((2, 16, 2, 64))
  dout, dlse = normal((2, 40, 4, 64)), normal((2, 4, 40), jnp.float32)
  (out, lse), pullback = jax.vjp(
    lambda *a: flash_attention(*a, causal=True, return_lse=True), q, k, v
  )
  dq, dk, dv = pullback((dout, dlse))
  empty = slice(0, 40 - 16)
  assert (out[:, empty] == 0).all() and (lse[:, :, empty] == -jnp.inf).all()
  assert (dq[:, empty] == 0).all()
  for x in (out, dq, dk, dv):
    assert jnp.isfinite(x).all()
  assert jnp.isfinite(lse[:, :, 40 - 16 :]).all()


def test_float32_reference_with_seqused(normal, record_error):
  """Per-sequence lengths, as the contract has them: rows past seqused_q see nothing."""
  q, k, v = (
    normal(shape, jnp.float32) for shape in ((3, 50, 4, 64), (3, 70, 2, 64), (3, 70, 2, 64))
  )
  dout = normal((3, 50, 4, 64), jnp.float32)
  seqused_q, seqused_k = jnp.array([50, 17, 0], jnp.int32), jnp.array([70, 0, 33], jnp.int32)
  params = dict(softmax_scale=0.125, softcap=0.0, window_left=9, window_right=0, diagonal_offset=20)
  absent = jnp.zeros((0,), jnp.int32)
  out, lse = reference.attention_fwd(
    q, k, v, seqused_q, seqused_k, absent, absent, absent, **params
  )
  grads = reference.attention_bwd(
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
    absent,
    **params,
    deterministic=False,
  )
  expected = oracle.attention(
    q,
    k,
    v,
    dout,
    scale=0.125,
    window=(9, 0),
    diagonal_offset=20,
    seqused_q=np.asarray(seqused_q),
    seqused_k=np.asarray(seqused_k),
  )
  assert (out[1, 17:] == 0).all() and (lse[2] == -jnp.inf).all()
  for name, actual, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected):
    _check(record_error, jnp.float32, name, actual, want, ulps=64)


@pytest.mark.parametrize("case", CASES[1::3], ids=str)
def test_gpu_tests_float32_oracle_matches_oracle(case, normal, record_error):
  """tests/gpu/kernel_ffi.py's float32 attention, which the GPU tests judge the kernels by
  (outputs, lse, and gradients with an lse cotangent), agrees with this float64 oracle."""
  q, k, v, dout, dlse = (x.astype(jnp.float32) for x in _inputs(case, normal))
  kwargs = dict(
    softmax_scale=case.scale or case.head_dim**-0.5,
    softcap=case.softcap,
    window=(case.window[0], 0 if case.causal else case.window[1]),
    diagonal_offset=case.seqlen_k - case.seqlen_q,
  )
  out, lse, _ = kernel_ffi.oracle_and_baseline(q, k, v, **kwargs)
  grads, _ = kernel_ffi.gradient_oracle_and_baseline(q, k, v, dout, dlse, **kwargs)
  expected = _expected(case, q, k, v, dout, dlse)
  for name, actual, want in zip(
    ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected, strict=True
  ):
    _check(record_error, jnp.float32, name, actual, want, ulps=64)


def test_gpu_tests_float32_oracle_with_seqused(normal, record_error):
  """kernel_ffi's float32 oracle with per-sequence lengths (rows past seqused_q see nothing)."""
  q, k, v = (
    normal(shape, jnp.float32) for shape in ((3, 50, 4, 64), (3, 70, 2, 64), (3, 70, 2, 64))
  )
  dout = normal((3, 50, 4, 64), jnp.float32)
  seqused_q, seqused_k = jnp.array([50, 17, 0], jnp.int32), jnp.array([70, 0, 33], jnp.int32)
  kwargs = dict(softmax_scale=0.125, window=(9, 0), diagonal_offset=20)
  lengths = dict(seqused_q=seqused_q, seqused_k=seqused_k)
  out, lse, _ = kernel_ffi.oracle_and_baseline(q, k, v, **kwargs, **lengths)
  grads, _ = kernel_ffi.gradient_oracle_and_baseline(q, k, v, dout, **kwargs, **lengths)
  expected = oracle.attention(
    q,
    k,
    v,
    dout,
    scale=0.125,
    window=(9, 0),
    diagonal_offset=20,
    seqused_q=np.asarray(seqused_q),
    seqused_k=np.asarray(seqused_k),
  )
  for name, actual, want in zip(
    ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected, strict=True
  ):
    _check(record_error, jnp.float32, name, actual, want, ulps=64)
