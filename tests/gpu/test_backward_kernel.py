"""The backward kernel against float32 gradients, called through its FFI target.

Accuracy follows FlashAttention's rule on dq, dk and dv: max|ours - ref| <= 2 max|base - ref|
+ 1e-5, with ref the float32 gradients and base the same computation in the input dtype.
The forward inputs (out, lse) come from our forward kernel, as in training."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_ffi
from test_forward_kernel import CAUSAL, Case, _inputs


def _cases():
  cases = []
  for d in (64, 128, 256):
    for dtype in ("bfloat16", "float16"):
      cases.append(Case(dtype, d, 2, 1000, 1000, 4, 4))
      cases.append(Case(dtype, d, 1, 333, 777, 8, 2, window=CAUSAL))
    cases += [
      Case("bfloat16", d, 2, 511, 1500, 8, 1, window=CAUSAL, diagonal="top_left"),  # MQA
      Case("bfloat16", d, 1, 1500, 511, 8, 8, window=CAUSAL),  # rows with no key
      Case("bfloat16", d, 2, 257, 257, 4, 4, window=(64, 16)),
      Case("float16", d, 2, 129, 1025, 2, 2, softcap=30.0),
      Case("bfloat16", d, 3, 900, 1100, 8, 2, window=CAUSAL, seqused=True),
      Case("float16", d, 2, 7, 7, 2, 1, window=CAUSAL),
    ]
  cases += [
    Case("bfloat16", 128, 1, 2048, 2048, 8, 1, window=CAUSAL),  # GQA 8:1
    Case("bfloat16", 128, 1, 4096, 4096, 2, 2),
    Case("bfloat16", 64, 2, 1, 300, 4, 4),
    Case("bfloat16", 128, 1, 640, 2000, 4, 4, window=(100, -1)),
    Case("bfloat16", 64, 2, 2048, 2048, 4, 4, window=CAUSAL, softcap=15.0),
    # More (key block, head, batch) tiles than an H100 has SMs: the persistent CTAs of
    # unmasked runs take several tiles each (K/V reloads, the Q/dO ring and the dQ
    # hand-offs carried over from tile to tile).
    Case("bfloat16", 128, 2, 1000, 1000, 16, 16),
    Case("bfloat16", 256, 2, 777, 1000, 16, 4),
    Case("bfloat16", 256, 2, 1000, 1000, 16, 16),
    # Masked runs with more tiles than SMs: the persistent CTAs claim tiles dynamically.
    Case("bfloat16", 128, 2, 1000, 1500, 16, 16, window=CAUSAL),
    Case("float16", 256, 2, 700, 900, 8, 8, window=(100, 50)),
    Case("float16", 128, 3, 300, 1500, 12, 3, softcap=20.0),
  ]
  return cases + _random_cases(24, seed=4)


def _random_cases(count, seed):
  """Configs drawn at random (a fixed draw, so test ids are stable): odd lengths either
  way round, GQA groups up to 8, causal with either alignment, windows, softcap."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    heads = int(rng.choice([2, 4, 8]))
    kv_heads = heads // int(rng.choice([g for g in (1, 2, 4, 8) if heads % g == 0]))
    window = [(-1, -1), CAUSAL, (int(rng.integers(0, 300)), int(rng.integers(-1, 200)))][
      rng.integers(3)
    ]
    cases.append(
      Case(
        str(rng.choice(["bfloat16", "float16"])),
        int(rng.choice([64, 128, 256])),
        int(rng.integers(1, 4)),
        int(rng.integers(1, 1600)),
        int(rng.integers(1, 1600)),
        heads,
        kv_heads,
        window=window,
        diagonal=str(rng.choice(["bottom_right", "top_left"])),
        softcap=float(rng.choice([0.0, 0.0, 0.0, 20.0])),
        seqused=bool(rng.random() < 0.2),
      )
    )
  return cases


CASES = _cases()


def _run(case, seed, deterministic=False):
  q, k, v, seqused_q, seqused_k = _inputs(case, seed)
  rng = np.random.default_rng(seed + 1)
  dout = jnp.asarray(
    rng.standard_normal((case.batch, case.seqlen_q, case.heads, case.head_dim), np.float32), q.dtype
  )
  kwargs = dict(
    softmax_scale=1 / math.sqrt(case.head_dim),
    softcap=case.softcap,
    window=case.window,
    diagonal_offset=case.offset(),
  )
  lengths = dict(seqused_q=seqused_q, seqused_k=seqused_k)

  @jax.jit
  def ours(q, k, v, dout):
    out, lse = kernel_ffi.fwd(q, k, v, **kwargs, **lengths)
    return kernel_ffi.bwd(dout, q, k, v, out, lse, **kwargs, **lengths, deterministic=deterministic)

  return (q, k, v, dout, kwargs, lengths), ours(q, k, v, dout)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_backward_matches_oracle(index):
  case = CASES[index]
  if (case.dtype, case.head_dim) not in kernel_ffi.compiled("bwd"):
    pytest.fail(f"backward variant {case.dtype} d{case.head_dim} not compiled")
  (q, k, v, dout, kwargs, lengths), grads = _run(case, seed=2000 + index)
  _assert_accurate(q, k, v, dout, kwargs, lengths, grads)


def _assert_accurate(q, k, v, dout, kwargs, lengths, grads):
  ref, base = kernel_ffi.gradient_oracle_and_baseline(q, k, v, dout, **kwargs, **lengths)
  for name, ours, r, b in zip(("dq", "dk", "dv"), grads, ref, base):
    ours, r, b = (np.asarray(x, np.float32) for x in (ours, r, b))
    assert not np.isnan(ours).any(), f"{name}: unwritten or NaN elements"
    err, base_err = np.max(np.abs(ours - r)), np.max(np.abs(b - r))
    assert err <= 2 * base_err + 1e-5, (
      f"{name} error {err:.3e} > 2 x baseline {base_err:.3e} + 1e-5"
    )


@pytest.mark.parametrize(
  "case",
  [
    Case("bfloat16", 128, 2, 1000, 1000, 4, 4, window=CAUSAL),
    Case("bfloat16", 64, 1, 777, 999, 8, 2),
    Case("bfloat16", 256, 1, 555, 1000, 4, 2, window=CAUSAL),
    Case("float16", 64, 2, 1200, 700, 8, 2, window=(200, 30)),
    Case("bfloat16", 128, 1, 1500, 1500, 4, 4, window=CAUSAL, diagonal="top_left"),
  ],
  ids=str,
)
def test_deterministic_is_bitwise_reproducible(case):
  (q, k, v, dout, kwargs, lengths), first = _run(case, seed=7, deterministic=True)
  _assert_accurate(q, k, v, dout, kwargs, lengths, first)
  first = [np.asarray(g) for g in first]
  for _ in range(9):
    _, again = _run(case, seed=7, deterministic=True)
    for a, b in zip(first, again):
      assert np.array_equal(a, np.asarray(b)), "deterministic gradients changed between runs"
