"""STAND-IN for helper B's jax_fa3/fp8_quantize.py (issue 15), for the CPU tests of the FP8
Python layer until that module is merged: the contract's numerics (/work/notes/fp8_contract.md)
in plain JAX. tests/conftest.py installs it as `jax_fa3.fp8_quantize` only while the real
module is missing. DELETE this file and that hook when fp8_quantize.py is merged."""

import jax.numpy as jnp
import numpy as np

_E4M3_MAX = 448.0


def random_signs(head_dim, seed=0):
  return jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], head_dim), jnp.float32)


def _walsh_hadamard(x):
  """Unnormalised Walsh-Hadamard transform (Sylvester order) along the last axis."""
  *lead, d = x.shape
  half = 1
  while half < d:
    pairs = x.reshape(*lead, d // (2 * half), 2, half)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    half *= 2
  return x


def quantize_fp8(x, *, block_rows, signs=None):
  batch, seqlen, heads, head_dim = x.shape
  x = x.astype(jnp.float32)
  if signs is not None:
    x = _walsh_hadamard(x * signs) / np.sqrt(head_dim)
  rows = seqlen if block_rows is None else block_rows
  blocks = -(-seqlen // rows)
  padded = jnp.pad(x, [(0, 0), (0, blocks * rows - seqlen), (0, 0), (0, 0)])
  amax = jnp.max(jnp.abs(padded.reshape(batch, blocks, rows, heads, head_dim)), axis=(2, 4))
  amax = jnp.swapaxes(amax, 1, 2)  # [batch, heads, blocks]
  descale = jnp.where(amax > 0, amax / _E4M3_MAX, 1.0)
  scale = jnp.where(amax > 0, _E4M3_MAX / jnp.where(amax > 0, amax, 1.0), 1.0)
  per_row = jnp.repeat(scale, rows, axis=2)[:, :, :seqlen]  # [batch, heads, seqlen]
  scaled = x * jnp.transpose(per_row, (0, 2, 1))[..., None]
  x8 = jnp.clip(scaled, -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)
  return x8, descale.astype(jnp.float32)
