"""FP8 (e4m3) quantization for attention inputs: block scales and incoherent processing.

`quantize_fp8(x, block_rows=..., signs=...)` turns `x [batch, seqlen, heads, head_dim]`
(bfloat16, float16 or float32) into `x8` (float8_e4m3fn, same shape) and the float32
`descale [batch, heads, n_blocks]` that multiplies it back: `x' ~= x8 * descale`, where
- `x' = WHT(x * signs) / sqrt(head_dim)` with `signs` (a random-sign Hadamard rotation,
  orthogonal: q'.k' = q.k when q and k use the same signs), or `x' = x` without;
- each (batch, head, block of `block_rows` rows) has its own scale (`block_rows=None`: one
  per (batch, head)): `descale = amax(|x'|) / 448` (to an ulp) over the block, 1.0 for an
  all-zero block, and `x8 = e4m3(x' * (448 / amax))`, rounded to nearest even, saturated
  to +-448.

On a Hopper GPU with the CUDA extension this is one kernel (FFI target
`jax_fa3_fp8_quantize`, `cuda/quantize/`) that reads x once (twice for a block longer than
64 rows: the second read from L2, or, past 256 rows, by a second launch) and writes x8 and
descale, the transform done in registers and warp shuffles. Elsewhere, and for head dims
other than 64, 128 and 256, the same function runs as XLA ops. Both do the same float32
operations in the same order, so they agree bit for bit (see `quantize_fp8`).

The primitive (rather than a bare `jax.ffi.ffi_call`) picks the kernel or the XLA ops per
platform at lowering, so one jitted function runs on CPU and GPU; its vmap rule folds the
mapped axis into the batch (one launch, no loop); it says that there is no gradient.
"""

import functools
import importlib
import operator
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from jax_fa3 import _kernels, _primitive_rules

E4M3_MAX = 448.0
QUANTIZE_TARGET = "jax_fa3_fp8_quantize"
# The head dims cuda/quantize/quantize.cu is compiled for (its handler refuses others).
KERNEL_HEAD_DIMS = (64, 128, 256)
# Rows a kernel CTA takes (cuda/quantize/geometry.h: kQuantizeChunkRows): longer blocks take
# two launches, with an amax per chunk in the workspace between them.
_CHUNK_ROWS = 256
_INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_TINY_AMAX = np.float32(2.0**-64)
_TINY_PRESCALE = np.float32(2.0**64)


def random_signs(head_dim: int, seed: int = 0) -> jax.Array:
  """The fixed random sign vector (float32 [head_dim] of +-1) for `quantize_fp8`'s `signs`.

  The same (head_dim, seed) gives the same vector on every machine and version: bit 63 of
  SplitMix64 (a fixed integer hash) of seed * 2^32 + i decides entry i.
  """
  head_dim = _positive_int("random_signs: head_dim", head_dim)
  seed = operator.index(seed)
  with np.errstate(over="ignore"):
    z = (np.uint64(seed % 2**32) << np.uint64(32)) + np.arange(head_dim, dtype=np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return jnp.asarray(np.where(z >> np.uint64(63), -1.0, 1.0).astype(np.float32))


def quantize_fp8(x, *, block_rows: int | None, signs=None) -> tuple[jax.Array, jax.Array]:
  """Quantizes `x [batch, seqlen, heads, head_dim]` to float8_e4m3fn with per-block scales.

  Args:
    x: bfloat16, float16 or float32 `[batch, seqlen, heads, head_dim]`.
    block_rows: rows per scale (a positive int; the last block of a sequence may be
      shorter), or None for one scale per (batch, head).
    signs: None (no rotation), or `[head_dim]` of +-1 (e.g. `random_signs(head_dim)`);
      head_dim must then be a power of two. Only each entry's sign bit is used.

  Returns:
    `(x8, descale)`: x8 float8_e4m3fn of x's shape, descale float32
    `[batch, heads, n_blocks]`, `n_blocks = ceil(seqlen / block_rows)` (1 for None), so
    that `x8[b, i, h].astype(float32) * descale[b, h, i // block_rows]` ~= x'[b, i, h].

  The arithmetic, in float32, in this order (the kernel's and the XLA ops' alike):
  1. y = x, with its sign flipped where `signs` is negative (exact);
  2. with signs, the Walsh-Hadamard butterflies (a, b) -> (a + b, a - b) over head_dim with
     strides 1, 2, 4, ..., head_dim / 2, then x' = y * float32(1 / sqrt(head_dim));
  3. amax = max |x'| over the block (NaN if any element is NaN);
  4. descale = amax * float32(1 / 448) (within an ulp of amax / 448: a product, which XLA
     cannot rewrite, so both paths round it alike), and
     x8 = e4m3((x' * p) * (448 / (amax * p))), round to nearest
     even, saturated to +-448, where p = 2^64 if amax < 2^-64 (else 1; exact either way,
     it keeps 448 / amax finite); an all-zero block has descale 1 and x8 = 0.
  A block holding NaN gets descale NaN and x8 NaN; one holding +-inf gets descale inf.
  The kernel and the XLA ops agree bit for bit, up to the sign of NaNs and values below
  2^-126 (float32 subnormals), which XLA's CPU backend flushes to zero and the kernel keeps.

  Works under jit and vmap (any in_axes, signs mapped too); has no gradient (rounding to
  e4m3 is piecewise constant). Inside `jax.shard_map` it quantizes each device's shard; on
  arrays sharded under jit (no shard_map) the kernel has no partitioning rule, so XLA
  gathers x first (the XLA-ops path, off Hopper, partitions as usual).
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(
      f"quantize_fp8: x must be [batch, seqlen, heads, head_dim]; got shape {x.shape}"
    )
  if x.dtype not in _INPUT_DTYPES:
    raise TypeError(f"quantize_fp8: x must be bfloat16, float16 or float32; got {x.dtype}")
  block = _block_rows_attribute(block_rows)
  return tuple(fp8_quantize_p.bind(x, _signs_operand(signs, x.shape[3]), block_rows=block))


def num_blocks(seqlen: int, block_rows: int | None) -> int:
  """Scales per (batch, head): ceil(seqlen / block_rows), or 1 for block_rows None."""
  return 1 if not block_rows else -(-seqlen // block_rows)


def workspace_bytes(batch, seqlen, heads, block_rows) -> int:
  """Bytes of scratch the kernel needs (cuda/quantize/geometry.h, QuantizeGeometry): a float32
  amax per CTA when a block is longer than a CTA takes; 256 otherwise (block_rows 0 or None:
  one block per (batch, head))."""
  rows = min(block_rows or seqlen, seqlen)
  chunks = max(1, -(-rows // _CHUNK_ROWS))
  needed = 4 * batch * heads * num_blocks(seqlen, block_rows) * chunks if chunks > 1 else 0
  return max(256, -(-needed // 256) * 256)


# --- Argument checks -----------------------------------------------------------------


def _positive_int(name, value):
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int; got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int; got {value!r}") from None
  if value < 1:
    raise ValueError(f"{name} must be >= 1; got {value}")
  return value


def _block_rows_attribute(block_rows):
  """block_rows as the primitive's parameter: 0 for None (one block per (batch, head))."""
  if block_rows is None:
    return 0
  return _positive_int(
    "quantize_fp8: block_rows (or None for one scale per batch and head)", block_rows
  )


def _signs_operand(signs, head_dim):
  """The signs as the primitive's operand: float32 [head_dim], or float32 [0] for none."""
  if signs is None:
    return jnp.zeros((0,), jnp.float32)
  if head_dim & (head_dim - 1):
    raise ValueError(
      f"quantize_fp8: signs (the Hadamard rotation) need a power-of-two "
      f"head_dim; got head_dim {head_dim}"
    )
  if not hasattr(signs, "dtype"):
    signs = np.asarray(signs)
  shape, dtype = np.shape(signs), signs.dtype
  if shape != (head_dim,):
    raise ValueError(
      f"quantize_fp8: signs must have shape (head_dim,) = ({head_dim},); got {shape}"
    )
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"quantize_fp8: signs must be real numbers (+-1); got dtype {dtype}")
  if not isinstance(signs, jax.core.Tracer):
    values = np.asarray(signs, np.float32)
    if not np.all(np.abs(values) == 1):
      raise ValueError(
        f"quantize_fp8: signs must all be +1 or -1; got {values[np.abs(values) != 1][:4]}"
      )
  return jnp.asarray(signs, jnp.float32)


# --- The computation as XLA ops (the reference, and the path off Hopper) -----------------


def _walsh_hadamard(y, signs):
  """y * sign(signs), the butterflies with strides 1, 2, ..., d / 2, then * float32(1/sqrt(d))."""
  d = y.shape[-1]
  y = jnp.where(jnp.signbit(signs), -y, y)
  h = 1
  while h < d:
    pairs = y.reshape(*y.shape[:-1], d // (2 * h), 2, h)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(*y.shape)
    h *= 2
  return y * np.float32(1.0 / np.sqrt(d))


def _round_to_e4m3(v):
  """float32 v in [-448, 448] (or NaN) rounded to the nearest e4m3 value, ties to even,
  still float32: the quantum is 2^(e - 3) for |v| in [2^e, 2^(e+1)), e >= -6, and 2^-9
  below 2^-6 (subnormals). Exact, so the final cast to float8 rounds nothing on any backend."""
  exponent_bits = jax.lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0x7F800000)
  binade = jax.lax.bitcast_convert_type(exponent_bits, jnp.float32)  # 2^e; 0 below 2^-126
  quantum = jnp.maximum(binade, np.float32(2.0**-6)) * np.float32(2.0**-3)
  return jnp.round(v / quantum) * quantum


def _quantize_xla(x, signs, *, block_rows):
  batch, seqlen, heads, head_dim = x.shape
  y = x.astype(jnp.float32)
  if signs.shape[0]:
    y = _walsh_hadamard(y, signs)
  rows = block_rows or seqlen
  blocks = num_blocks(seqlen, block_rows)
  y = jnp.pad(y, ((0, 0), (0, blocks * rows - seqlen), (0, 0), (0, 0)))
  y = y.reshape(batch, blocks, rows, heads, head_dim)
  amax = jnp.max(jnp.abs(y), axis=(2, 4), initial=0.0, keepdims=True)
  # XLA's CPU reduce-max may drop NaNs; the kernel's keeps them.
  amax = jnp.where(jnp.any(jnp.isnan(y), axis=(2, 4), keepdims=True), np.float32(np.nan), amax)
  prescale = jnp.where(amax < _TINY_AMAX, _TINY_PRESCALE, np.float32(1))
  zero = amax == 0
  scale = jnp.where(zero, np.float32(1), np.float32(E4M3_MAX) / (amax * prescale))
  descale = jnp.where(zero, np.float32(1), amax * np.float32(1 / E4M3_MAX))
  scaled = jnp.clip((y * prescale) * scale, -E4M3_MAX, E4M3_MAX)
  x8 = _round_to_e4m3(scaled).astype(jnp.float8_e4m3fn)
  x8 = x8.reshape(batch, blocks * rows, heads, head_dim)[:, :seqlen]
  return x8, descale.reshape(batch, blocks, heads).transpose(0, 2, 1)


# --- The kernel ------------------------------------------------------------------------


@functools.cache
def _kernel_compiled() -> bool:
  """Whether the extension has the quantizer (importing jax_fa3 registered its targets)."""
  try:
    extension = importlib.import_module("jax_fa3._fa3_cuda")
  except ImportError:
    return False
  return QUANTIZE_TARGET in extension.registrations()


@functools.cache
def _warn_once(message):
  warnings.warn(message)


def _kernel_applies(x) -> bool:
  """Whether the CUDA lowering runs the kernel (else the XLA ops, which give the same bits)."""
  if x.size == 0 or _kernels.gpus_without_kernels():  # nothing to do, or not a Hopper GPU
    return False
  if not _kernel_compiled():
    _warn_once(
      f"jax_fa3: the CUDA extension has no FP8 quantizer ({QUANTIZE_TARGET}; built "
      f"before it existed, or not built); quantizing with XLA ops instead."
    )
    return False
  if x.shape[3] not in KERNEL_HEAD_DIMS:
    _warn_once(
      f"jax_fa3: the FP8 quantizer kernel is compiled for head dims "
      f"{KERNEL_HEAD_DIMS}, not {x.shape[3]}; quantizing with XLA ops instead."
    )
    return False
  return True


def _quantize_cuda(x, signs, *, block_rows):
  if not _kernel_applies(x):
    return _quantize_xla(x, signs, block_rows=block_rows)
  batch, seqlen, heads, head_dim = x.shape
  x8, descale, _ = jax.ffi.ffi_call(
    QUANTIZE_TARGET,
    (
      jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
      jax.ShapeDtypeStruct((batch, heads, num_blocks(seqlen, block_rows)), jnp.float32),
      jax.ShapeDtypeStruct((workspace_bytes(batch, seqlen, heads, block_rows),), jnp.uint8),
    ),
  )(x, signs, block_rows=int(block_rows))
  return x8, descale


# --- The primitive -----------------------------------------------------------------------


def _abstract_eval(x, signs, *, block_rows):
  del signs
  batch, seqlen, heads, _ = x.shape
  spec_b, _, spec_n, _ = x.sharding.spec
  per_block = x.sharding.update(spec=jax.sharding.PartitionSpec(spec_b, spec_n, None))
  return (
    x.update(dtype=jnp.float8_e4m3fn),
    x.update(
      shape=(batch, heads, num_blocks(seqlen, block_rows)), dtype=jnp.float32, sharding=per_block
    ),
  )


def _batch(args, dims, *, block_rows):
  """vmap: the mapped axis joins the batch. Signs mapped (one vector per instance) are
  applied here, a sign flip being exact, and the kernel rotates with all-positive signs."""
  x, signs = args
  x_dim, signs_dim = dims
  size = x.shape[x_dim] if x_dim is not None else signs.shape[signs_dim]
  x = batching.bdim_at_front(x, x_dim, size)
  if signs_dim is not None:
    signs = batching.bdim_at_front(signs, signs_dim, size)
    x = jnp.where(jnp.signbit(signs)[:, None, None, None, :], -x, x)
    signs = jnp.ones(signs.shape[1:], jnp.float32)
  x8, descale = fp8_quantize_p.bind(x.reshape(-1, *x.shape[2:]), signs, block_rows=block_rows)
  return [x8.reshape(size, -1, *x8.shape[1:]), descale.reshape(size, -1, *descale.shape[1:])], [
    0,
    0,
  ]


def _no_gradient(primals, tangents, **params):
  raise NotImplementedError(
    "quantize_fp8 has no gradient: rounding to float8_e4m3fn is piecewise constant. "
    "Differentiate with respect to the unquantized inputs instead (jax_fa3.fp8_attention "
    "does: its backward runs on the dequantized inputs)."
  )


fp8_quantize_p = _primitive_rules.define_primitive(
  "fa3_fp8_quantize", _abstract_eval, _quantize_xla, _quantize_cuda, batcher=lambda _: _batch
)
ad.primitive_jvps[fp8_quantize_p] = _no_gradient
