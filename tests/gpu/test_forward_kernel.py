"""The forward kernel against a float32 oracle, called through its FFI target.

Accuracy follows FlashAttention's rule: max|ours - ref| <= 2 max|base - ref| + 1e-5, where
ref is float32 attention and base is the same attention in the input dtype, both on the
same low-precision inputs. Outputs are poisoned with NaN before each launch (conftest)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_ffi


@dataclasses.dataclass(frozen=True)
class Case:
  dtype: str
  head_dim: int
  batch: int
  seqlen_q: int
  seqlen_k: int
  heads: int
  kv_heads: int
  window: tuple = (-1, -1)
  diagonal: str = "bottom_right"  # or "top_left", or an int offset
  softcap: float = 0.0
  seqused: bool = False

  def offset(self):
    if self.diagonal == "bottom_right":
      return self.seqlen_k - self.seqlen_q
    if self.diagonal == "top_left":
      return 0
    return int(self.diagonal)

  def __str__(self):
    w = "" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}"
    extra = (f"-cap{self.softcap:g}" if self.softcap else "") + ("-seqused" if self.seqused else "")
    return (
      f"{self.dtype}-d{self.head_dim}-b{self.batch}-q{self.seqlen_q}-k{self.seqlen_k}"
      f"-h{self.heads}_{self.kv_heads}{w}-{self.diagonal}{extra}"
    )


CAUSAL = (-1, 0)
_DIMS = (64, 96, 128, 192, 256)


def _cases():
  cases = []
  # Every head dim and dtype: plain, causal, odd lengths, GQA.
  for d in _DIMS:
    for dtype in ("bfloat16", "float16"):
      cases.append(Case(dtype, d, 2, 1000, 1000, 4, 4))
      cases.append(Case(dtype, d, 1, 333, 777, 8, 2, window=CAUSAL))
    cases.append(Case("bfloat16", d, 3, 1, 513, 8, 1))  # decode, MQA
    cases.append(Case("bfloat16", d, 1, 700, 300, 4, 2, window=CAUSAL))  # rows with no key
    cases.append(Case("bfloat16", d, 2, 257, 257, 4, 4, window=(64, 16)))  # local
    cases.append(Case("float16", d, 2, 129, 1025, 2, 2, softcap=30.0))
  # Alignments, offsets, windows, lengths and seqused at head dim 128 and 64.
  for d in (64, 128):
    cases += [
      Case("bfloat16", d, 2, 511, 1500, 8, 4, window=CAUSAL, diagonal="top_left"),
      Case("bfloat16", d, 2, 1500, 511, 8, 4, window=CAUSAL, diagonal="top_left"),
      Case("bfloat16", d, 1, 1024, 1024, 4, 1, window=CAUSAL, diagonal=-300),
      # d64: the last length of the 128-row masked kernel, and the first past it.
      Case("bfloat16", d, 2, 1024, 1024, 4, 2, window=CAUSAL),
      Case("bfloat16", d, 2, 1025, 1025, 4, 2, window=CAUSAL),
      Case("bfloat16", d, 1, 640, 640, 4, 4, window=(0, 0)),  # only the diagonal
      Case("bfloat16", d, 1, 640, 2000, 4, 4, window=(100, -1)),  # left bound only
      Case("float16", d, 2, 7, 7, 2, 1, window=CAUSAL),
      Case("float16", d, 2, 113, 1, 2, 2),
      Case("bfloat16", d, 3, 900, 1100, 8, 8, seqused=True),
      Case("bfloat16", d, 3, 900, 1100, 8, 2, window=CAUSAL, seqused=True),
      Case("bfloat16", d, 2, 2048, 2048, 4, 4, window=CAUSAL, softcap=15.0),
      Case("bfloat16", d, 1, 4096 + 17, 4096 + 17, 2, 2),
      Case("bfloat16", d, 1, 5000, 300, 4, 2),  # short keys, long queries (d128: wide window)
      Case("bfloat16", d, 1, 64, 4000, 4, 4, window=(500, 200)),
    ]
  return cases


CASES = _cases()


def _inputs(case, seed):
  """Fresh standard-normal inputs (drawn on the host: no compile per shape)."""
  rng = np.random.default_rng(seed)
  dt = jnp.dtype(case.dtype)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dt)

  q = normal(case.batch, case.seqlen_q, case.heads, case.head_dim)
  k = normal(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
  v = normal(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
  seqused_q = seqused_k = None
  if case.seqused:
    seqused_q = jnp.asarray(rng.integers(0, case.seqlen_q + 1, case.batch), jnp.int32)
    seqused_k = jnp.asarray(rng.integers(0, case.seqlen_k + 1, case.batch), jnp.int32)
  return q, k, v, seqused_q, seqused_k


def test_variant_table_is_complete():
  assert kernel_ffi.compiled("fwd") >= {(dt, d) for dt in ("bfloat16", "float16") for d in _DIMS}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_forward_matches_oracle(index):
  case = CASES[index]
  if (case.dtype, case.head_dim) not in kernel_ffi.compiled("fwd"):
    pytest.fail(f"variant {case.dtype} d{case.head_dim} not compiled")
  q, k, v, seqused_q, seqused_k = _inputs(case, seed=1000 + index)
  kwargs = dict(
    softmax_scale=1 / math.sqrt(case.head_dim),
    softcap=case.softcap,
    window=case.window,
    diagonal_offset=case.offset(),
  )
  lengths = dict(seqused_q=seqused_q, seqused_k=seqused_k)
  out, lse = jax.jit(lambda *a: kernel_ffi.fwd(*a, **kwargs, **lengths))(q, k, v)
  ref, ref_lse, base = kernel_ffi.oracle_and_baseline(q, k, v, **kwargs, **lengths)

  out, ref, base = (np.asarray(x, np.float32) for x in (out, ref, base))
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  assert not np.isnan(out).any(), "unwritten or NaN output elements"
  assert not np.isnan(lse).any(), "unwritten or NaN LSE elements"

  empty = np.isneginf(ref_lse)  # [b, h, q]: rows that see no key
  assert np.array_equal(np.isneginf(lse), empty), (
    "LSE -inf rows differ from the oracle's empty rows"
  )
  empty_rows = np.transpose(empty, (0, 2, 1))  # [b, q, h]
  assert np.all(out[empty_rows] == 0), "rows with no visible key must be exactly 0"

  err = np.max(np.abs(out - ref))
  base_err = np.max(np.abs(base - ref))
  assert err <= 2 * base_err + 1e-5, f"out error {err:.3e} > 2 x baseline {base_err:.3e} + 1e-5"
  finite = ~empty
  if finite.any():
    lse_err = np.max(np.abs(lse[finite] - ref_lse[finite]))
    # scores carry tanh.approx's error (rel. 2^-11) times the softcap
    lse_tol = 1e-3 + 2e-3 * case.softcap
    assert lse_err <= lse_tol, f"lse error {lse_err:.3e} > {lse_tol:.1e}"
