"""The public API on the GPU: it must lower to the kernels and agree with the oracle."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
import kernel_ffi


def _qkv(seed, b, sq, sk, h, hk, d, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, sq, h, d), np.float32), dtype)
  k = jnp.asarray(rng.standard_normal((b, sk, hk, d), np.float32), dtype)
  v = jnp.asarray(rng.standard_normal((b, sk, hk, d), np.float32), dtype)
  return q, k, v


def _check(out, ref, base):
  out, ref, base = (np.asarray(x, np.float32) for x in (out, ref, base))
  assert not np.isnan(out).any()
  err, base_err = np.max(np.abs(out - ref)), np.max(np.abs(base - ref))
  assert err <= 2 * base_err + 1e-5, (err, base_err)


def test_kernels_are_available():
  assert jax_fa3.kernels_available(), str(jax_fa3.kernels_available())


@pytest.mark.parametrize("d", [64, 80, 128])  # 80 runs padded to the 96 kernel
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_uses_the_kernel(d, causal):
  q, k, v = _qkv(d + causal, 2, 300, 500, 4, 2, d)
  f = jax.jit(lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal, return_lse=True))
  assert "jax_fa3_fwd" in f.lower(q, k, v).as_text()
  out, lse = f(q, k, v)
  kw = dict(
    softmax_scale=1 / math.sqrt(d), window=(-1, 0) if causal else (-1, -1), diagonal_offset=200
  )
  ref, ref_lse, base = kernel_ffi.oracle_and_baseline(q, k, v, **kw)
  _check(out, ref, base)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=1e-3)


def test_dot_product_attention_matches_jax_nn_on_gpu():
  q, k, v = _qkv(7, 2, 256, 256, 8, 2, 128)
  lengths = jnp.array([200, 256], jnp.int32)
  ours = jax.jit(
    lambda q, k, v: jax_fa3.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="fa3"
    )
  )(q, k, v)
  ref = jax.nn.dot_product_attention(
    *(x.astype(jnp.float32) for x in (q, k, v)),
    is_causal=True,
    key_value_seq_lengths=lengths,
    implementation="xla",
  )
  base = jax.nn.dot_product_attention(
    q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="xla"
  )
  _check(ours, ref, base)


def test_gradients_run_on_gpu():
  q, k, v = _qkv(11, 1, 128, 128, 2, 2, 64)
  loss = lambda q, k, v: jnp.sum(
    jax_fa3.flash_attention(q, k, v, causal=True).astype(jnp.float32) ** 2
  )
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  ref_loss = lambda q, k, v: jnp.sum(
    jax.nn.dot_product_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True
    )
    ** 2
  )
  ref = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=5e-2, rtol=5e-2)


def _loss(q, k, v):
  return jnp.sum(jax_fa3.flash_attention(q, k, v, causal=True).astype(jnp.float32) ** 2)


def _ref_loss(q, k, v):
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) ** 2)


@pytest.mark.parametrize("transform", ["jit", "vmap", "scan", "checkpoint"])
def test_gradients_through_transformations(transform):
  q, k, v = _qkv(21, 2, 200, 200, 4, 2, 128)
  if transform == "jit":
    f = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
    grads, ref = f(q, k, v), jax.grad(_ref_loss, argnums=(0, 1, 2))(q, k, v)
  elif transform == "vmap":  # the batch axis mapped, each call sees batch 1
    f = jax.jit(jax.vmap(jax.grad(_loss, argnums=(0, 1, 2)), in_axes=(0, 0, 0)))
    g = jax.vmap(jax.grad(_ref_loss, argnums=(0, 1, 2)), in_axes=(0, 0, 0))
    grads, ref = f(q[:, None], k[:, None], v[:, None]), g(q[:, None], k[:, None], v[:, None])
  elif transform == "scan":  # two layers sharing k, v

    def layers(q, k, v):
      out, _ = jax.lax.scan(
        lambda x, _: (jax_fa3.flash_attention(x, k, v, causal=True), None), q, None, length=2
      )
      return jnp.sum(out.astype(jnp.float32) ** 2)

    def ref_layers(q, k, v):
      out, _ = jax.lax.scan(
        lambda x, _: (
          jax.nn.dot_product_attention(
            x, k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True
          ),
          None,
        ),
        q.astype(jnp.float32),
        None,
        length=2,
      )
      return jnp.sum(out**2)

    grads = jax.jit(jax.grad(layers, argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(ref_layers, argnums=(0, 1, 2))(q, k, v)
  else:
    f = jax.jit(jax.grad(jax.checkpoint(_loss), argnums=(0, 1, 2)))
    grads, ref = f(q, k, v), jax.grad(_ref_loss, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert np.max(np.abs(g - r)) <= 2e-2 * np.max(np.abs(r)) + 1e-3


def test_backward_uses_the_kernel():
  q, k, v = _qkv(5, 1, 128, 128, 2, 2, 128)
  text = jax.jit(jax.grad(_loss)).lower(q, k, v).as_text()
  assert "jax_fa3_bwd" in text


@pytest.mark.parametrize("d", [96, 192, 256])  # 96 and 192 run padded to the 128 and 256 kernels
def test_gradients_at_every_head_dim(d):
  q, k, v = _qkv(31, 2, 300, 300, 4, 2, d)
  f = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
  assert "jax_fa3_bwd" in f.lower(q, k, v).as_text()
  grads, ref = f(q, k, v), jax.grad(_ref_loss, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert np.max(np.abs(g - r)) <= 2e-2 * np.max(np.abs(r)) + 1e-3


# --- The lse's gradient, against the float32 oracle ------------------------------
# flash_attention differentiates its lse with the backward kernel run on v with a column
# of ones appended (attention.py's _attention_bwd), so head_dim_v = d + 1, padded up to
# the next compiled backward kernel: d64 and d96 run the d128 kernel, d128 and d192 the
# d256 one. At d256 no kernel holds 257 columns: that backward lowers to the float32
# reference (with a warning), hence the expected failure below.
LSE_GRADIENT_CASES = [
  # (head_dim, dtype, batch, seqlen_q, seqlen_k, heads, kv_heads, causal)
  (d, dtype, b, sq, sk, h, hk, causal)
  for d in (64, 96, 128, 192, 256)
  for dtype, b, sq, sk, h, hk, causal in [
    ("bfloat16", 2, 1000, 1000, 4, 4, False),
    ("float16", 1, 333, 777, 8, 2, True),  # GQA, causal aligned bottom-right
    ("bfloat16", 2, 700, 300, 4, 2, True),  # rows that see no key: lse -inf, no gradient
  ]
]


def _lse_gradient_case_id(case):
  d, dtype, b, sq, sk, h, hk, causal = case
  return f"{dtype}-d{d}-b{b}-q{sq}-k{sk}-h{h}_{hk}" + ("-causal" if causal else "")


@pytest.mark.parametrize("cotangents", ["lse_only", "out_and_lse"])
@pytest.mark.parametrize("case", LSE_GRADIENT_CASES, ids=_lse_gradient_case_id)
def test_lse_gradient_matches_oracle(case, cotangents):
  """dq, dk, dv of <out, dout> + <lse, dlse> through flash_attention(return_lse=True),
  under FlashAttention's rule: max|ours - ref| <= 2 max|base - ref| + 1e-5, with ref the
  float32 gradients and base the same computation in the input dtype. "lse_only" has
  dout = 0, so only the lse's gradient is measured."""
  d, dtype, b, sq, sk, h, hk, causal = case
  dtype = jnp.dtype(dtype)
  q, k, v = _qkv(7 * d + sq, b, sq, sk, h, hk, d, dtype)
  rng = np.random.default_rng(d + sk)
  dout = jnp.asarray(rng.standard_normal((b, sq, h, d), np.float32), dtype)
  if cotangents == "lse_only":
    dout = jnp.zeros_like(dout)
  dlse = jnp.asarray(rng.standard_normal((b, h, sq), np.float32))

  @jax.jit
  def ours(q, k, v, dout, dlse):
    _, pullback = jax.vjp(
      lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal, return_lse=True), q, k, v
    )
    return pullback((dout, dlse))

  grads = ours(q, k, v, dout, dlse)
  kwargs = dict(
    softmax_scale=1 / math.sqrt(d), window=(-1, 0) if causal else (-1, -1), diagonal_offset=sk - sq
  )
  ref, base = kernel_ffi.gradient_oracle_and_baseline(q, k, v, dout, dlse, **kwargs)
  for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base, strict=True):
    g, r, bs = (np.asarray(x, np.float32) for x in (g, r, bs))
    assert not np.isnan(g).any() and not np.isnan(r).any(), f"{name}: NaN"
    err, base_err = np.max(np.abs(g - r)), np.max(np.abs(bs - r))
    assert err <= 2 * base_err + 1e-5, (
      f"{name} error {err:.3e} > 2 x baseline {base_err:.3e} + 1e-5"
    )


@pytest.mark.parametrize(
  "d",
  [
    64,
    96,
    128,
    192,
    pytest.param(
      256,
      marks=pytest.mark.xfail(
        strict=True,
        reason="no backward kernel holds head_dim_v 257 (v + the ones column): the "
        "lse's gradient at d256 runs the float32 reference",
      ),
    ),
  ],
)
def test_lse_gradient_uses_the_backward_kernel(d):
  q, k, v = _qkv(3, 1, 128, 128, 2, 2, d)
  loss = lambda q, k, v: jnp.sum(jax_fa3.flash_attention(q, k, v, return_lse=True)[1])
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert "jax_fa3_bwd" in text, "the lse's gradient does not run the backward kernel"


@pytest.mark.parametrize(
  "batch, heads, kv_heads", [(70000, 2, 1), (1, 70000, 7000)], ids=["batch_70000", "heads_70000"]
)
def test_gradients_past_a_grid_dimension(batch, heads, kv_heads):
  """70000 batch rows or heads (sizes a vmapped or windowed model reaches): the backward's
  pre- and postprocess grids stop at 65535 in y (heads) and z (batch) and loop over the
  rest; the forward and main backward kernels number their tiles along x."""
  q, k, v = _qkv(31, batch, 8, 8, heads, kv_heads, 64)
  dout = _qkv(32, batch, 8, 8, heads, kv_heads, 64)[0]

  @jax.jit
  def ours(q, k, v, dout):
    out, pullback = jax.vjp(lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=True), q, k, v)
    return (out, *pullback(dout))

  @functools.partial(jax.jit, static_argnums=0)
  def reference(dtype, q, k, v, dout):  # operands, not constants: XLA would fold them
    f = lambda q, k, v: jax.nn.dot_product_attention(
      *(x.astype(dtype) for x in (q, k, v)), is_causal=True
    ).astype(dtype)
    o, pull = jax.vjp(f, q, k, v)
    return (o, *pull(dout.astype(dtype)))

  axis = 0 if batch > heads else 2
  for name, result, ref, base in zip(
    ("out", "dq", "dk", "dv"),
    ours(q, k, v, dout),
    reference(jnp.float32, q, k, v, dout),
    reference(jnp.bfloat16, q, k, v, dout),
    strict=True,
  ):
    _check(result, ref, base)
    if result.shape[axis] > 65535:
      tail = np.asarray(
        jax.lax.slice_in_dim(result, 65535, result.shape[axis], axis=axis), np.float32
      )
      assert np.abs(tail).max() > 0, (
        f"{name}: the entries past 65535 along axis {axis} were not written"
      )
