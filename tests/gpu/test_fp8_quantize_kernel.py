"""The FP8 quantizer kernel (FFI target jax_fa3_fp8_quantize) against quantize_fp8's XLA-ops
path run on the CPU, which tests/test_fp8_quantize.py holds to a NumPy spec. Both do the same
float32 operations in the same order and round to e4m3 the same way, so x8 and descale must
be equal bit for bit (NaNs compared as NaNs). Outputs are NaN-poisoned before each launch
(conftest.py), so an element the kernel leaves unwritten shows up as a difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fa3 import fp8_quantize
from jax_fa3.fp8_quantize import quantize_fp8, random_signs
from kernel_ffi import _registered

TARGET = fp8_quantize.QUANTIZE_TARGET
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def on_cpu(x, block_rows, signs):
  """quantize_fp8 on the CPU backend: the XLA-ops path."""
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    put = lambda a: None if a is None else jax.device_put(np.asarray(a), cpu)
    return quantize_fp8(put(x), block_rows=block_rows, signs=put(signs))


def assert_bitwise_equal(got, want):
  """x8 (uint8 bits) and descale (uint32 bits) equal; a NaN only where the reference has one."""
  for name, a, b, bits in (
    ("x8", got[0], want[0], np.uint8),
    ("descale", got[1], want[1], np.uint32),
  ):
    a_float, b_float = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    nan = np.isnan(b_float)
    np.testing.assert_array_equal(np.isnan(a_float), nan, err_msg=f"{name}: NaN in other places")
    a_bits, b_bits = np.asarray(a).view(bits), np.asarray(b).view(bits)
    mismatched = np.flatnonzero((a_bits != b_bits) & ~nan)
    assert mismatched.size == 0, (
      f"{name}: {mismatched.size} of {a_bits.size} differ, first at flat index {mismatched[0]}: "
      f"kernel {a_float.ravel()[mismatched[0]]}, reference {b_float.ravel()[mismatched[0]]}"
    )


def assert_within_one_e4m3_step(got, want):
  """XLA's GPU ops against its CPU ops: the float32 steps may round differently (division,
  fusion), so an x8 value may land one e4m3 step away; descales agree to float32 rounding."""
  a, b = (np.asarray(x, np.float32) for x in (got[0], want[0]))
  step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 2.0**-6))) - 3)  # e4m3: 3 mantissa bits
  assert np.all(np.abs(a - b) <= step), (
    f"x8: {np.sum(np.abs(a - b) > step)} values more than one e4m3 step apart"
  )
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-6)


def kernel(x, block_rows, signs, workspace=None, descale_blocks=None):
  """The FFI target called directly, bypassing the primitive."""
  _registered()
  batch, seqlen, heads, head_dim = x.shape
  blocks = fp8_quantize.num_blocks(seqlen, block_rows) if descale_blocks is None else descale_blocks
  if workspace is None:
    workspace = fp8_quantize.workspace_bytes(batch, seqlen, heads, block_rows)
  x8, descale, _ = jax.ffi.ffi_call(
    TARGET,
    (
      jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
      jax.ShapeDtypeStruct((batch, heads, blocks), jnp.float32),
      jax.ShapeDtypeStruct((workspace,), jnp.uint8),
    ),
  )(x, jnp.zeros((0,), jnp.float32) if signs is None else signs, block_rows=int(block_rows or 0))
  return x8, descale


def inputs(normal, shape, dtype):
  """Normal values with outliers (x30 on one in 500), as attention inputs have."""
  x = np.asarray(normal(shape, jnp.float32))
  outliers = np.random.default_rng(shape[1]).random(shape) < 0.002
  return jnp.asarray(np.where(outliers, 30 * x, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_rows", [64, "k_block", None])
@pytest.mark.parametrize("rotate", [True, False])
def test_kernel_equals_the_reference_bit_for_bit(normal, dtype, head_dim, block_rows, rotate):
  if block_rows == "k_block":  # the attention kernel's key tiles: 160 (d64), 224 (d128), 128 (d256)
    block_rows = {64: 160, 128: 224, 256: 128}[head_dim]
  x = inputs(normal, (2, 1000, 3, head_dim), dtype)
  signs = random_signs(head_dim, seed=7) if rotate else None
  assert_bitwise_equal(kernel(x, block_rows, signs), on_cpu(x, block_rows, signs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "head_dim, seqlen, block_rows",
  [
    (64, 1, 64),
    (64, 1, None),
    (128, 63, 64),
    (128, 65, None),
    (256, 129, 128),
    (256, 127, None),
    (128, 4097, None),  # longer than a CTA takes (256 rows): two launches
    (64, 3001, 1000),  # blocks longer than a CTA: two launches, a short last block
    (128, 600, 257),  # 257 > 256 rows: two chunks per block, the second of one row
    (256, 300, 129),  # three 64-row slabs a CTA, the last of one row, read twice
    (128, 100, 1),
  ],
)
def test_odd_lengths_and_long_blocks(normal, dtype, head_dim, seqlen, block_rows):
  x = inputs(normal, (2, seqlen, 5, head_dim), dtype)
  signs = random_signs(head_dim)
  assert_bitwise_equal(kernel(x, block_rows, signs), on_cpu(x, block_rows, signs))


def test_many_heads_and_blocks(normal):
  """More CTAs than a grid's y or z dimension would take (76800 here)."""
  x = inputs(normal, (4, 64, 300, 64), jnp.bfloat16)
  signs = random_signs(64)
  assert_bitwise_equal(kernel(x, 1, signs), on_cpu(x, 1, signs))
  assert_bitwise_equal(kernel(x, None, signs), on_cpu(x, None, signs))


def test_zero_tiny_and_non_finite_blocks(normal):
  x = np.array(normal((1, 256, 4, 128), jnp.float32))
  x[0, :64, 0] = 0  # an all-zero block: descale 1, x8 0
  x[0, 64:128, 0] = -0.0  # negative zeros
  x[0, 128:192, 0] *= 1e-30  # amax below 2^-64
  x[0, 192:, 0] *= 1e30  # large but finite
  x[0, 3, 1, 7] = np.nan  # NaN: its block only
  x[0, 70, 2, 0] = np.inf  # inf: its block only
  signs = random_signs(128)
  for s in (signs, None):
    for block_rows in (64, None):
      assert_bitwise_equal(kernel(jnp.asarray(x), block_rows, s), on_cpu(x, block_rows, s))


def test_the_public_function_runs_the_kernel_under_jit_and_vmap(normal):
  x = inputs(normal, (3, 2, 333, 4, 128), jnp.bfloat16)
  signs = random_signs(128)
  call = lambda x: quantize_fp8(x, block_rows=64, signs=signs)
  assert TARGET in jax.jit(call).lower(x[0]).as_text()
  assert TARGET in jax.jit(jax.vmap(call)).lower(x).as_text()
  got = jax.jit(jax.vmap(call))(x)
  for i in range(3):
    assert_bitwise_equal((got[0][i], got[1][i]), on_cpu(x[i], 64, signs))
  mapped_signs = jnp.stack([random_signs(128, seed=s) for s in range(3)])
  got = jax.vmap(lambda x, s: quantize_fp8(x, block_rows=None, signs=s))(x, mapped_signs)
  for i in range(3):
    assert_bitwise_equal((got[0][i], got[1][i]), on_cpu(x[i], None, mapped_signs[i]))


def test_other_head_dims_run_as_xla_ops(normal):
  x = inputs(normal, (1, 50, 2, 96), jnp.bfloat16)
  fp8_quantize._warn_once.cache_clear()  # pylint: disable=protected-access
  with pytest.warns(UserWarning, match="compiled for head dims"):
    text = jax.jit(lambda x: quantize_fp8(x, block_rows=16)).lower(x).as_text()
  assert TARGET not in text
  assert_within_one_e4m3_step(quantize_fp8(x, block_rows=16), on_cpu(x, 16, None))


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda x: kernel(x[..., :96], 64, None), "head_dim must be 64, 128 or 256"),
    (lambda x: kernel(x, 64, jnp.ones((32,), jnp.float32)), "signs must be float32 \\[head_dim\\]"),
    (
      lambda x: kernel(x, 64, None, descale_blocks=3),
      "descale must be float32 \\[batch, heads, 16\\]",
    ),
    (lambda x: kernel(x, None, None, workspace=4), "workspace must be uint8 of at least"),
  ],
)
def test_the_handler_refuses_bad_calls(normal, call, message):
  x = inputs(normal, (1, 1000, 2, 128), jnp.bfloat16)  # None: 1000 rows, 4 chunks of 256
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(call(x))
