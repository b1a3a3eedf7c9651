"""Direct calls of the FFI targets, bypassing the primitives: the kernel contract
(cuda/ffi/CONTRACT.md) tested on its own, plus a float32 oracle of the same semantics,
which the GPU tests judge the kernels by (tests/test_numerics.py checks it against the
float64 oracle, tests/oracle.py, on the CPU)."""

import functools
import glob
import importlib.machinery
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

_PACKAGE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "jax_fa3")


@functools.cache
def extension():
  """The compiled extension, loaded by path so a broken Python layer can't hide it."""
  suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
  directory = os.environ.get("JAX_FA3_EXT_DIR", _PACKAGE_DIR)
  paths = glob.glob(os.path.join(directory, "_fa3_cuda*" + suffix))
  if not paths:
    import jax_fa3._fa3_cuda as ext  # an installed package

    return ext
  loader = importlib.machinery.ExtensionFileLoader("jax_fa3._fa3_cuda", paths[0])
  spec = importlib.util.spec_from_loader("jax_fa3._fa3_cuda", loader)
  module = importlib.util.module_from_spec(spec)
  loader.exec_module(module)
  return module


@functools.cache
def _registered():
  """Registers the extension's FFI targets. XLA takes the same handler twice (importing
  jax_fa3 registers the installed extension's), but refuses another handler under a name
  already taken, e.g. when JAX_FA3_EXT_DIR loads another build than jax_fa3 did: that
  error must stop the tests, or they would call the other build's kernels."""
  module = extension()
  for name, capsule in module.registrations().items():
    try:
      jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    except Exception as e:
      raise RuntimeError(
        f"kernel_ffi: registering FFI target {name!r} of "
        f"{getattr(module, '__file__', module)} failed: {e}"
      ) from e
  return True


def compiled(direction):
  """{(input dtype name, head_dim)} of the compiled kernels of `direction`."""
  return {(d, int(hd)) for (dr, d, _, hd, _) in extension().variants() if dr == direction}


def descale_blocks():
  """{(dtype, out_dtype, head_dim): (q_block_rows, k_block_rows)} of the FP8 forward kernels."""
  return {(t, o, int(h)): (int(m), int(n)) for t, o, h, m, n in extension().descale_blocks()}


# The packed-sequence operands (rows and tile plans), absent: tested through the public API
# (test_segments.py), since their plans are made in JAX.
_NO_SEGMENTS = (np.zeros((0,), np.int32),) * 4
# Attention sinks, absent: tested through the public API (test_sinks.py). The FP8 descales
# when absent (factor 1) are the same float32 [0] array.
_NO_SINKS = np.zeros((0,), np.float32)


def _seqused(x, batch):
  return jnp.zeros((0,), jnp.int32) if x is None else jnp.asarray(x, jnp.int32).reshape(batch)


def _descale(x):
  return _NO_SINKS if x is None else jnp.asarray(x, jnp.float32)


def fwd(
  q,
  k,
  v,
  *,
  softmax_scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  seqused_q=None,
  seqused_k=None,
  descale_q=None,
  descale_k=None,
  descale_v=None,
  out_dtype=None,
):
  """The forward FFI target. FP8: descale_q [B, H, QB], descale_k [B, Hk, KB], descale_v
  [B, Hk] (None: absent) and the output dtype (default bfloat16 for float8 inputs)."""
  _registered()
  b, sq, h, _ = q.shape
  if out_dtype is None:
    out_dtype = jnp.bfloat16 if q.dtype == jnp.float8_e4m3fn else q.dtype
  out_types = (
    jax.ShapeDtypeStruct((b, sq, h, v.shape[-1]), out_dtype),
    jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
    jax.ShapeDtypeStruct((256,), jnp.uint8),
    jax.ShapeDtypeStruct((1,), jnp.uint32),  # max_logit, not asked for
  )
  call = jax.ffi.ffi_call("jax_fa3_fwd", out_types)
  out, lse, _, _ = call(
    q,
    k,
    v,
    _seqused(seqused_q, b),
    _seqused(seqused_k, b),
    *_NO_SEGMENTS[:3],
    _NO_SINKS,
    *map(_descale, (descale_q, descale_k, descale_v)),
    softmax_scale=np.float32(softmax_scale),
    softcap=np.float32(softcap),
    window_left=int(window[0]),
    window_right=int(window[1]),
    diagonal_offset=int(diagonal_offset),
    return_max_logit=False,
  )
  return out, lse


def visible_mask(sq, sk, window, diagonal_offset, seqused_q, seqused_k, batch):
  """[batch, 1, sq, sk] bool: the contract's visibility rule."""
  i = jnp.arange(sq)[:, None]
  j = jnp.arange(sk)[None, :]
  c = i + diagonal_offset
  ok = jnp.ones((sq, sk), bool)
  if window[0] >= 0:
    ok &= j >= c - window[0]
  if window[1] >= 0:
    ok &= j <= c + window[1]
  lq = jnp.full((batch,), sq) if seqused_q is None else jnp.asarray(seqused_q)
  lk = jnp.full((batch,), sk) if seqused_k is None else jnp.asarray(seqused_k)
  ok = ok[None] & (i[None] < lq[:, None, None]) & (j[None] < lk[:, None, None])
  return ok[:, None]


@functools.partial(
  jax.jit, static_argnames=("softmax_scale", "softcap", "window", "diagonal_offset", "dtype")
)
def attention(
  q,
  k,
  v,
  *,
  softmax_scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  seqused_q=None,
  seqused_k=None,
  dtype=jnp.float32,
):
  """Plain attention computed in `dtype`: float32 is the oracle, the input dtype the baseline."""
  b, sq, h, _ = q.shape
  sk, hk = k.shape[1], k.shape[2]
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  k = jnp.repeat(k, h // hk, axis=2)
  v = jnp.repeat(v, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(
    softmax_scale, dtype
  )
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  ok = visible_mask(sq, sk, window, diagonal_offset, seqused_q, seqused_k, b)
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum(
    "bhqk,bkhd->bqhd",
    (p / jnp.where(l > 0, l, 1)).astype(dtype),
    v,
    precision=jax.lax.Precision.HIGHEST,
  )
  lse = jnp.where(
    l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1)) + m[..., 0], -jnp.inf
  )
  return o, lse.astype(jnp.float32)


@functools.partial(
  jax.jit, static_argnames=("softmax_scale", "softcap", "window", "diagonal_offset")
)
def oracle_and_baseline(q, k, v, **kwargs):
  """(float32 output, float32 lse, output computed in the input dtype), in one compile."""
  ref, ref_lse = attention(q, k, v, **kwargs)
  base, _ = attention(q, k, v, dtype=q.dtype, **kwargs)
  return ref, ref_lse, base


def bwd(
  dout,
  q,
  k,
  v,
  out,
  lse,
  *,
  softmax_scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  seqused_q=None,
  seqused_k=None,
  deterministic=False,
  workspace_bytes=None,
):
  """The backward FFI target; the workspace defaults to the package's own formula."""
  _registered()
  from jax_fa3 import primitives

  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  if workspace_bytes is None:
    workspace_bytes = primitives.bwd_workspace_bytes(b, sq, sk, h, hk, d, v.shape[-1])
  out_types = (
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    jax.ShapeDtypeStruct(k.shape, k.dtype),
    jax.ShapeDtypeStruct(v.shape, v.dtype),
    jax.ShapeDtypeStruct((workspace_bytes,), jnp.uint8),
    jax.ShapeDtypeStruct((1,), jnp.float32),
  )  # dsinks, without sinks
  call = jax.ffi.ffi_call("jax_fa3_bwd", out_types)
  dq, dk, dv, _, _ = call(
    dout,
    q,
    k,
    v,
    out,
    lse,
    _seqused(seqused_q, b),
    _seqused(seqused_k, b),
    *_NO_SEGMENTS,
    _NO_SINKS,
    softmax_scale=np.float32(softmax_scale),
    softcap=np.float32(softcap),
    window_left=int(window[0]),
    window_right=int(window[1]),
    diagonal_offset=int(diagonal_offset),
    deterministic=bool(deterministic),
  )
  return dq, dk, dv


@functools.partial(
  jax.jit, static_argnames=("softmax_scale", "softcap", "window", "diagonal_offset")
)
def gradient_oracle_and_baseline(q, k, v, dout, dlse=None, **kwargs):
  """Gradients of <out, dout> (+ <lse, dlse> when dlse [B, H, Sq] is given) with respect to
  q, k, v: in float32 (the oracle) and in the input dtype (the baseline)."""

  def grads(dtype):
    if dlse is None:
      f = lambda q, k, v: attention(q, k, v, dtype=dtype, **kwargs)[0]
      cotangents = dout.astype(dtype)
    else:
      f = lambda q, k, v: attention(q, k, v, dtype=dtype, **kwargs)
      cotangents = (dout.astype(dtype), dlse.astype(jnp.float32))
    _, pullback = jax.vjp(f, q, k, v)
    return pullback(cotangents)

  return grads(jnp.float32), grads(q.dtype)


def fp8_lse_tolerance(q, k, scale, softcap=0.0):
  """The lse tolerance of the FP8 forward. Hopper's FP8 WGMMA adds its products with fewer
  mantissa bits than float32 keeps (about 13 in DeepSeek-V3's measurements), so the scores,
  and with them the lse, carry an error relative to the largest score magnitude, bounded by
  max |q_i| |k_j| * scale (q, k as the scores see them, `scale` whatever multiplies q.k);
  the softcap adds tanh.approx's error (relative 2^-11) times the softcap."""
  row_norm = lambda x: float(np.sqrt(np.sum(np.asarray(x, np.float32) ** 2, axis=-1)).max())
  return 1e-3 + 2.0**-11 * row_norm(q) * row_norm(k) * scale + 2e-3 * softcap


def assert_accurate(name, ours, ref, base, slack=0.0):
  """FlashAttention's accuracy rule: the kernel's error against the float32 oracle `ref` is at
  most twice that of `base` (the same computation in the input dtype), plus 1e-5 (plus
  `slack`, where a caller states why); no NaN (an element the kernel did not write: outputs
  are NaN-poisoned before each launch)."""
  ours, ref, base = (np.asarray(x, np.float32) for x in (ours, ref, base))
  assert not np.isnan(ours).any(), f"{name}: NaN (an element the kernel did not write)"
  err, base_err = np.max(np.abs(ours - ref)), np.max(np.abs(base - ref))
  assert err <= 2 * base_err + 1e-5 + slack, (
    f"{name}: error {err} > 2 * {base_err} + 1e-5 + {slack}"
  )
