"""quantize_fp8 on the CPU (its XLA-ops path): the rotation, the scales, the e4m3 rounding, the
argument checks, vmap and jit. The kernel is held to the same path bit for bit on the GPU
(tests/gpu/test_fp8_quantize_kernel.py)."""

import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_fa3 import fp8_quantize
from jax_fa3.fp8_quantize import quantize_fp8, random_signs
from test_kernel_arithmetic import _build

pytestmark = pytest.mark.usefixtures("on_cpu")

E4M3 = ml_dtypes.float8_e4m3fn


def spec_quantize(x, block_rows, signs):
  """quantize_fp8's docstring in NumPy float32, written apart from the package: the same
  operations in the same order, ml_dtypes' float32 -> e4m3 cast (nearest even) after the
  clip. Returns (x8 as uint8 bits, descale)."""
  y = np.asarray(x, np.float32)
  batch, seqlen, heads, d = y.shape
  if signs is not None:
    y = np.where(np.signbit(np.asarray(signs)), -y, y)
    index = np.arange(d)
    h = 1
    while h < d:
      lower = index[(index & h) == 0]
      a, b = y[..., lower], y[..., lower + h]
      y = y.copy()
      y[..., lower], y[..., lower + h] = a + b, a - b
      h *= 2
    y = y * np.float32(1 / np.sqrt(d))
  rows = block_rows or seqlen
  blocks = -(-seqlen // block_rows) if block_rows else 1
  x8 = np.zeros(y.shape, np.uint8)
  descale = np.zeros((batch, heads, blocks), np.float32)
  for n in range(blocks):
    part = y[:, n * rows : (n + 1) * rows]
    amax = np.max(np.abs(part), axis=(1, 3), initial=np.float32(0))[:, None, :, None]
    pre = np.where(amax < np.float32(2.0**-64), np.float32(2.0**64), np.float32(1))
    with np.errstate(divide="ignore"):
      scale = np.where(amax == 0, np.float32(1), np.float32(448) / (amax * pre))
    descale[:, :, n] = np.where(amax == 0, np.float32(1), amax * np.float32(1 / 448))[:, 0, :, 0]
    scaled = np.clip((part * pre) * scale, np.float32(-448), np.float32(448))
    x8[:, n * rows : (n + 1) * rows] = scaled.astype(E4M3).view(np.uint8)
  return x8, descale


def bits(x8):
  return np.asarray(x8).view(np.uint8)


def per_row(descale, block_rows):
  """descale [batch, heads, blocks] as [batch, blocks * block_rows, heads, 1], to multiply x8."""
  return np.repeat(np.asarray(descale, np.float64), block_rows, axis=2).transpose(0, 2, 1)[
    ..., None
  ]


def hadamard_matrix(d):
  """Sylvester's Hadamard matrix (entries +-1), float64."""
  h = np.ones((1, 1))
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
  "head_dim, block_rows, seqlen",
  [(64, 64, 100), (128, 224, 450), (256, 128, 129), (128, None, 77), (64, 1, 5), (32, 7, 30)],
)
@pytest.mark.parametrize("rotate", [True, False])
def test_matches_the_numpy_spec_bit_for_bit(normal, dtype, head_dim, block_rows, seqlen, rotate):
  x = normal((2, seqlen, 3, head_dim), dtype) * 3
  signs = random_signs(head_dim, seed=head_dim) if rotate else None
  x8, descale = quantize_fp8(x, block_rows=block_rows, signs=signs)
  want_bits, want_descale = spec_quantize(x, block_rows, signs)
  assert x8.dtype == jnp.float8_e4m3fn and x8.shape == x.shape
  assert descale.dtype == jnp.float32
  assert descale.shape == (2, 3, -(-seqlen // block_rows) if block_rows else 1)
  np.testing.assert_array_equal(bits(x8), want_bits)
  np.testing.assert_array_equal(np.asarray(descale), want_descale)


@pytest.mark.parametrize("head_dim", [2, 64, 128, 256])
def test_the_rotation_is_the_normalised_hadamard_matrix_and_orthogonal(normal, head_dim):
  q, k = normal((2, 16, 4, head_dim), jnp.float32), normal((2, 16, 4, head_dim), jnp.float32)
  signs = random_signs(head_dim, seed=3)
  rotate = lambda x: fp8_quantize._walsh_hadamard(x, signs)
  matrix = np.asarray(signs, np.float64)[:, None] * hadamard_matrix(head_dim) / np.sqrt(head_dim)
  np.testing.assert_allclose(
    np.asarray(rotate(q)), np.asarray(q, np.float64) @ matrix, rtol=0, atol=1e-5 * np.sqrt(head_dim)
  )
  norms = lambda x: np.linalg.norm(np.asarray(x, np.float64), axis=-1)
  np.testing.assert_allclose(norms(rotate(q)), norms(q), rtol=2e-6 * np.log2(head_dim) + 1e-6)
  dots = lambda a, b: np.einsum(
    "bqhd,bkhd->bhqk", np.asarray(a, np.float64), np.asarray(b, np.float64)
  )
  np.testing.assert_allclose(
    dots(rotate(q), rotate(k)),
    dots(q, k),
    rtol=0,
    atol=4e-6 * np.log2(head_dim) * np.sqrt(head_dim) + 1e-6,
  )


def test_quantized_scores_stay_close_with_the_rotation(normal):
  """q8 . k8 * descales approximates q . k with the rotation too (the rotation cancels)."""
  q, k = (normal((1, 64, 2, 128), jnp.float32) for _ in range(2))
  signs = random_signs(128)
  dequantized = []
  for x in (q, k):
    x8, descale = quantize_fp8(x, block_rows=32, signs=signs)
    dequantized.append(np.asarray(x8, np.float64) * per_row(descale, 32))
  scores = np.einsum("bqhd,bkhd->bhqk", *dequantized)
  exact = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  assert np.sqrt(np.mean((scores - exact) ** 2)) < 0.1 * np.sqrt(np.mean(exact**2))


@pytest.mark.parametrize("block_rows", [16, None])
def test_descale_is_amax_over_448_and_the_amax_element_becomes_448(normal, block_rows):
  """descale = amax * float32(1 / 448): within an ulp of amax / 448."""
  x = normal((2, 48, 3, 64), jnp.float32)
  signs = random_signs(64)
  x8, descale = quantize_fp8(x, block_rows=block_rows, signs=signs)
  rotated = np.asarray(fp8_quantize._walsh_hadamard(x, signs))
  rows = block_rows or 48
  amax = np.abs(rotated).reshape(2, 48 // rows, rows, 3, 64).max(axis=(2, 4)).transpose(0, 2, 1)
  np.testing.assert_array_equal(np.asarray(descale), amax * np.float32(1 / 448))
  np.testing.assert_allclose(np.asarray(descale), amax / np.float32(448), rtol=2**-23, atol=0)
  largest = np.abs(np.asarray(x8, np.float32)).reshape(2, 48 // rows, rows, 3, 64).max(axis=(2, 4))
  np.testing.assert_array_equal(largest, 448)
  dequantized = np.asarray(x8, np.float64) * per_row(descale, rows)
  # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value, or 2^-10 * descale below 2^-6.
  bound = np.maximum(np.abs(rotated) * 2.0**-4, per_row(descale, rows) * 2.0**-10)
  assert np.all(np.abs(dequantized - rotated) <= bound * (1 + 1e-6))


def test_rounding_to_e4m3_is_nearest_even_with_saturation():
  """Every e4m3 midpoint (a tie), its float32 neighbours, random values and the range ends."""
  finite = np.arange(0, 0x7F, dtype=np.uint8).view(E4M3).astype(np.float32)  # 0 ... 448
  midpoints = (finite[:-1] + finite[1:]) / 2
  near = np.concatenate(
    [
      midpoints,
      np.nextafter(midpoints, np.float32(0)),
      np.nextafter(midpoints, np.float32(np.inf)),
      finite,
      np.random.default_rng(0).uniform(-448, 448, 10000).astype(np.float32),
      np.float32([2.0**-10, 2.0**-11, 1e-30, 0.0, -0.0]),
    ]
  )
  values = np.concatenate([near, -near]).astype(np.float32)
  got = fp8_quantize._round_to_e4m3(jnp.asarray(values)).astype(jnp.float8_e4m3fn)
  np.testing.assert_array_equal(bits(got), values.astype(E4M3).view(np.uint8))
  saturated = jnp.clip(jnp.float32([448, 449, 464, 470, 1e6, np.inf, -500, -np.inf]), -448, 448)
  assert list(np.asarray(fp8_quantize._round_to_e4m3(saturated))) == [448] * 6 + [-448] * 2


def test_zero_and_empty_blocks(normal):
  x = np.array(normal((1, 40, 2, 64), jnp.float32))
  x[:, 16:32] = 0  # the second block of 16 rows is zero
  x8, descale = quantize_fp8(x, block_rows=16, signs=random_signs(64))
  assert np.all(np.asarray(x8, np.float32)[:, 16:32] == 0)  # +0 or -0: the rotation signs zeros
  np.testing.assert_array_equal(np.asarray(descale)[:, :, 1], 1.0)
  assert np.all(np.asarray(descale)[:, :, [0, 2]] != 1.0)
  zeros8, ones = quantize_fp8(jnp.zeros((2, 5, 3, 64), jnp.bfloat16), block_rows=None)
  assert np.all(bits(zeros8) == 0) and np.all(np.asarray(ones) == 1.0) and ones.shape == (2, 3, 1)
  empty = jnp.zeros((2, 0, 3, 64), jnp.bfloat16)
  x8, descale = quantize_fp8(empty, block_rows=None)
  assert (
    x8.shape == (2, 0, 3, 64) and descale.shape == (2, 3, 1) and np.all(np.asarray(descale) == 1.0)
  )
  x8, descale = quantize_fp8(empty, block_rows=64)
  assert x8.shape == (2, 0, 3, 64) and descale.shape == (2, 3, 0)


def test_negative_zero_stays_negative():
  x = jnp.full((1, 4, 1, 64), -0.0, jnp.float32)
  x8, descale = quantize_fp8(x, block_rows=None)
  assert np.all(bits(x8) == 0x80) and float(descale[0, 0, 0]) == 1.0


def test_a_nan_poisons_its_own_block_only(normal):
  x = np.array(normal((1, 32, 2, 64), jnp.float32))
  x[0, 20, 1, 5] = np.nan
  x8, descale = quantize_fp8(x, block_rows=16, signs=random_signs(64))
  descale = np.asarray(descale)
  assert np.isnan(descale[0, 1, 1]) and np.all(np.isnan(np.asarray(x8, np.float32)[0, 16:, 1]))
  assert np.all(np.isfinite(np.delete(descale.reshape(-1), 3)))
  values = np.asarray(x8, np.float32)
  assert np.all(np.isfinite(values[0, :16])) and np.all(np.isfinite(values[0, :, 0]))


def test_tiny_blocks_keep_their_precision(normal):
  """amax below 2^-64: 448 / amax alone would overflow float32; the block still quantizes."""
  x = normal((1, 8, 1, 64), jnp.float32) * 1e-30
  x8, descale = quantize_fp8(x, block_rows=None)
  assert np.all(np.isfinite(np.asarray(x8, np.float32)))
  np.testing.assert_allclose(
    np.asarray(x8, np.float64) * float(descale[0, 0, 0]),
    np.asarray(x, np.float64),
    rtol=2.0**-4,
    atol=float(descale[0, 0, 0]) * 2.0**-10,
  )
  want_bits, want_descale = spec_quantize(x, None, None)
  np.testing.assert_array_equal(bits(x8), want_bits)
  np.testing.assert_array_equal(np.asarray(descale), want_descale)


def test_block_rows_none_is_one_block_as_long_as_the_sequence(normal):
  x = normal((2, 77, 3, 128), jnp.bfloat16)
  signs = random_signs(128)
  whole = quantize_fp8(x, block_rows=None, signs=signs)
  for block_rows in (77, 1000):
    one_block = quantize_fp8(x, block_rows=block_rows, signs=signs)
    np.testing.assert_array_equal(bits(whole[0]), bits(one_block[0]))
    np.testing.assert_array_equal(np.asarray(whole[1]), np.asarray(one_block[1]))


def test_odd_lengths_cut_into_blocks_with_a_short_last_one(normal):
  x = normal((1, 101, 2, 64), jnp.float16)
  x8, descale = quantize_fp8(x, block_rows=25)
  assert descale.shape == (1, 2, 5)
  for n in range(5):
    part8, part_descale = quantize_fp8(x[:, 25 * n : 25 * (n + 1)], block_rows=None)
    np.testing.assert_array_equal(bits(x8)[:, 25 * n : 25 * (n + 1)], bits(part8))
    np.testing.assert_array_equal(np.asarray(descale)[:, :, n], np.asarray(part_descale)[:, :, 0])


def test_jit_and_vmap_match_the_plain_call(normal):
  x = normal((3, 2, 40, 4, 64), jnp.bfloat16)
  signs = random_signs(64)
  call = lambda x: quantize_fp8(x, block_rows=16, signs=signs)
  mapped_first = jax.jit(jax.vmap(call))(x)
  mapped_inside = jax.vmap(call, in_axes=2, out_axes=1)(jnp.moveaxis(x, 0, 2))
  for i in range(3):
    want8, want_descale = call(x[i])
    for x8, descale in (
      (mapped_first[0][i], mapped_first[1][i]),
      (mapped_inside[0][:, i], mapped_inside[1][:, i]),
    ):
      np.testing.assert_array_equal(bits(x8), bits(want8))
      np.testing.assert_array_equal(np.asarray(descale), np.asarray(want_descale))


def test_vmap_over_signs_and_nested(normal):
  x = normal((2, 24, 2, 64), jnp.float32)
  signs = jnp.stack([random_signs(64, seed=s) for s in range(3)])
  got = jax.vmap(lambda s: quantize_fp8(x, block_rows=8, signs=s))(signs)
  nested = jax.vmap(
    jax.vmap(lambda x, s: quantize_fp8(x, block_rows=8, signs=s), in_axes=(0, None)),
    in_axes=(None, 0),
  )(x[:, None], signs)
  for i in range(3):
    want8, want_descale = quantize_fp8(x, block_rows=8, signs=signs[i])
    np.testing.assert_array_equal(bits(got[0][i]), bits(want8))
    np.testing.assert_array_equal(np.asarray(got[1][i]), np.asarray(want_descale))
    np.testing.assert_array_equal(bits(nested[0][i][:, 0]), bits(want8))


def test_traced_signs_under_jit(normal):
  x = normal((1, 8, 1, 64), jnp.float32)
  signs = random_signs(64)
  got = jax.jit(lambda x, s: quantize_fp8(x, block_rows=None, signs=s))(x, signs)
  want = quantize_fp8(x, block_rows=None, signs=signs)
  np.testing.assert_array_equal(bits(got[0]), bits(want[0]))


def test_no_gradient_and_it_says_so(normal):
  x = normal((1, 8, 1, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="quantize_fp8 has no gradient"):
    jax.grad(lambda x: jnp.sum(quantize_fp8(x, block_rows=None)[1]))(x)


def test_random_signs_are_fixed_plus_minus_one():
  signs = np.asarray(random_signs(128))
  assert (
    signs.dtype == np.float32 and signs.shape == (128,) and set(np.unique(signs)) == {-1.0, 1.0}
  )
  np.testing.assert_array_equal(signs, np.asarray(random_signs(128)))
  assert not np.array_equal(signs, np.asarray(random_signs(128, seed=1)))
  np.testing.assert_array_equal(
    np.asarray(random_signs(64)), signs[:64]
  )  # a prefix: one hash per index
  assert 40 < np.sum(signs > 0) < 88
  # Pinned: the default vector never changes (checkpoints and FP8 caches may depend on it).
  assert "".join("+" if s > 0 else "-" for s in signs[:16]) == PINNED_SIGNS_SEED0


PINNED_SIGNS_SEED0 = "---+++-+--++--+-"


@pytest.mark.parametrize(
  "call, error, match",
  [
    (
      lambda x: quantize_fp8(x[..., :48], block_rows=8, signs=random_signs(48)),
      ValueError,
      "power-of-two head_dim; got head_dim 48",
    ),
    (
      lambda x: quantize_fp8(x, block_rows=8, signs=random_signs(32)),
      ValueError,
      r"signs must have shape \(head_dim,\) = \(64,\); got \(32,\)",
    ),
    (
      lambda x: quantize_fp8(x, block_rows=8, signs=jnp.ones((1, 64))),
      ValueError,
      "signs must have shape",
    ),
    (
      lambda x: quantize_fp8(x, block_rows=8, signs=jnp.full((64,), 2.0)),
      ValueError,
      "signs must all be",
    ),
    (
      lambda x: quantize_fp8(x, block_rows=8, signs=jnp.ones((64,), bool)),
      TypeError,
      "signs must be real",
    ),
    (lambda x: quantize_fp8(x, block_rows=0), ValueError, "block_rows .* must be >= 1; got 0"),
    (lambda x: quantize_fp8(x, block_rows=-3), ValueError, "block_rows .* must be >= 1"),
    (lambda x: quantize_fp8(x, block_rows=1.5), TypeError, "block_rows .* must be an int; got 1.5"),
    (lambda x: quantize_fp8(x, block_rows=True), TypeError, "block_rows .* must be an int"),
    (
      lambda x: quantize_fp8(x[0], block_rows=8),
      ValueError,
      r"x must be \[batch, seqlen, heads, head_dim\]",
    ),
    (
      lambda x: quantize_fp8(x.astype(jnp.int32), block_rows=8),
      TypeError,
      "x must be bfloat16, float16 or float32; got int32",
    ),
    (
      lambda x: quantize_fp8(x.astype(jnp.float8_e4m3fn), block_rows=8),
      TypeError,
      "got float8_e4m3fn",
    ),
    (lambda x: random_signs(0), ValueError, "head_dim must be >= 1"),
  ],
)
def test_bad_arguments_are_named(normal, call, error, match):
  with pytest.raises(error, match=match):
    call(normal((1, 8, 2, 64), jnp.float32))


def test_block_rows_is_required():
  with pytest.raises(TypeError, match="block_rows"):
    quantize_fp8(jnp.zeros((1, 8, 1, 64)))  # pylint: disable=missing-kwoa


def test_python_geometry_matches_the_kernels(tmp_path):
  """num_blocks and workspace_bytes against cuda/quantize/geometry.h, compiled on the host."""
  rng = np.random.default_rng(0)
  cases = [
    (
      int(rng.integers(1, 4)),
      int(rng.integers(0, 40000)),
      int(rng.integers(1, 9)),
      int(rng.choice([0, 1, 64, 128, 160, 224, 256, 257, 300, 1000, 5000])),
    )
    for _ in range(400)
  ]
  cases += [
    (1, 16384, 16, 0),
    (1, 0, 2, 0),
    (1, 0, 2, 64),
    (2, 256, 3, 0),
    (2, 257, 3, 0),
  ]
  stdin = "".join(" ".join(map(str, c)) + "\n" for c in cases)
  result = subprocess.run(
    [str(_build(tmp_path, "quantize_geometry_check"))],
    input=stdin,
    capture_output=True,
    text=True,
    check=True,
  )
  lines = result.stdout.splitlines()
  assert len(lines) == len(cases), (
    f"quantize_geometry_check printed {len(lines)} lines for {len(cases)} cases"
  )
  for (b, s, h, block_rows), line in zip(cases, lines):
    blocks, needed = map(int, line.split())
    assert fp8_quantize.num_blocks(s, block_rows) == blocks, (b, s, h, block_rows)
    assert fp8_quantize.workspace_bytes(b, s, h, block_rows) >= max(needed, 1), (
      b,
      s,
      h,
      block_rows,
    )
