"""The packed-sequence descriptors built by the CUDA kernels (cuda/plans/, through
segment_kernels.py) against segments.py's, which state them: equal entry for entry, for
documents, padding, recurring and colliding ids, windows, per-sequence offsets (varlen),
seqlen_q != seqlen_k, several rows, vmap, and the tile shapes of every compiled kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from documents import random_documents

from jax_fa3 import _kernels, segment_kernels, segments

# (name, windows (left, right)): none, causal, a local window, one bounded on the right.
WINDOWS = [(-1, -1), (-1, 0), (100, 0), (37, 5), (-1, 64)]


def _ids(rng, kind, length):
  if kind == "documents":
    return random_documents(rng, length, max(1, length // 7), pad=int(rng.integers(0, 9)))
  if kind == "recurring":  # documents whose ids come back later, and padding in between
    ids = random_documents(rng, length, max(1, length // 9)) % 4
    ids[rng.random(length) < 0.02] = -1
    return ids
  if kind == "random":  # ids changing almost every token: every slot of the table collides
    return rng.integers(-2, 50, length).astype(np.int32)
  if kind == "one":
    return np.zeros(length, np.int32)
  raise ValueError(kind)


CASES = [
  # (kind, batch, seqlen_q, seqlen_k, offsets)
  ("documents", 1, 4096, 4096, "zero"),
  ("documents", 3, 1000, 1000, "zero"),
  ("documents", 2, 777, 1531, "diagonal"),
  ("recurring", 2, 2048, 2048, "zero"),
  ("random", 1, 3001, 3001, "zero"),
  ("random", 2, 129, 300, "diagonal"),
  ("one", 1, 16384, 16384, "zero"),
  ("one", 1, 1, 1, "zero"),
  ("documents", 1, 5, 17, "varlen"),
  ("documents", 2, 2500, 2500, "varlen"),
]


def _rows_inputs(seed, kind, batch, seqlen_q, seqlen_k, offsets):
  rng = np.random.default_rng(seed)
  q_ids = np.stack([_ids(rng, kind, seqlen_q) for _ in range(batch)])
  if seqlen_q == seqlen_k and kind != "random":
    kv_ids = q_ids.copy()
  else:
    kv_ids = np.stack([_ids(rng, kind, seqlen_k) for _ in range(batch)])
  if offsets == "zero":
    q_off, kv_off = np.zeros_like(q_ids), np.zeros_like(kv_ids)
  elif offsets == "diagonal":  # one offset for the row, as flash_attention's diagonal_offset
    q_off = np.full_like(q_ids, seqlen_k - seqlen_q)
    kv_off = np.full_like(kv_ids, seqlen_k - seqlen_q)
  else:  # varlen: an offset per sequence, as flash_attention_varlen's bottom-right alignment
    per_id = rng.integers(-50, 50, 64).astype(np.int32)
    q_off, kv_off = per_id[np.maximum(q_ids, 0) % 64], per_id[np.maximum(kv_ids, 0) % 64]
  return [jnp.asarray(x) for x in (q_ids, kv_ids, q_off, kv_off)]


def _assert_equal(kernel, spec, what):
  kernel, spec = np.asarray(kernel), np.asarray(spec)
  assert kernel.shape == spec.shape, what
  wrong = np.argwhere(kernel != spec)
  assert wrong.size == 0, (
    f"{what}: {len(wrong)} entries differ, first at {wrong[0].tolist()}: "
    f"kernel {kernel[tuple(wrong[0][:-1])].tolist()} spec {spec[tuple(wrong[0][:-1])].tolist()}"
  )


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
  targets = _kernels.kernels_available().targets
  assert _kernels.SEGMENT_ROWS_TARGET in targets, "the extension has no plan kernels"


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_rows_match_segments(case, window):
  seed = CASES.index(case) * 10 + WINDOWS.index(window)
  q_ids, kv_ids, q_off, kv_off = _rows_inputs(seed, *case)
  kwargs = dict(window_left=window[0], window_right=window[1], q_offsets=q_off, kv_offsets=kv_off)
  kernel = jax.jit(lambda a, b: segment_kernels.rows(a, b, **kwargs))(q_ids, kv_ids)
  spec = jax.jit(lambda a, b: segments.rows(a, b, **kwargs))(q_ids, kv_ids)
  for side, k, s in zip(("q_rows", "kv_rows"), kernel, spec):
    _assert_equal(k, s, f"{side} {case} window {window}")


def test_rows_under_vmap():
  inputs = _rows_inputs(7, "recurring", 2, 1000, 1000, "zero")
  stacked = [jnp.stack([x, jnp.roll(x, 13, axis=-1)]) for x in inputs]

  def rows(module, q_ids, kv_ids, q_off, kv_off):
    return module.rows(
      q_ids, kv_ids, window_left=-1, window_right=0, q_offsets=q_off, kv_offsets=kv_off
    )

  kernel = jax.jit(jax.vmap(lambda *a: rows(segment_kernels, *a)))(*stacked)
  spec = jax.jit(jax.vmap(lambda *a: rows(segments, *a)))(*stacked)
  for side, k, s in zip(("q_rows", "kv_rows"), kernel, spec):
    _assert_equal(k, s, f"vmap {side}")


def _tile_shapes():
  """The compiled packed kernels' tiles, and a few others the plans must also get right."""
  shapes = set(_kernels.kernels_available().segment_tiles.values())
  return sorted(shapes | {(64, 64), (128, 176), (192, 128), (80, 112)})


def _spec_rows(seed, kind, batch, seqlen_q, seqlen_k, offsets, window):
  q_ids, kv_ids, q_off, kv_off = _rows_inputs(seed, kind, batch, seqlen_q, seqlen_k, offsets)
  return segments.rows(
    q_ids, kv_ids, window_left=window[0], window_right=window[1], q_offsets=q_off,
    kv_offsets=kv_off,
  )  # fmt: skip


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_tile_plans_match_segments(case, window):
  seed = 100 + CASES.index(case)
  q_rows, _ = _spec_rows(seed, *case, window)
  seqlen_k = case[3]
  for block_m, block_n in _tile_shapes():
    what = f"{case} window {window} tile {block_m}x{block_n}"
    kernel = jax.jit(lambda r: segment_kernels.forward_tiles(r, block_m, block_n))(q_rows)
    spec = jax.jit(lambda r: segments.forward_tiles(r, block_m, block_n))(q_rows)
    _assert_equal(kernel, spec, f"forward tiles {what}")
    kernel = jax.jit(lambda r: segment_kernels.backward_plans(r, seqlen_k, block_m, block_n))(
      q_rows
    )
    spec = jax.jit(lambda r: segments.backward_plans(r, seqlen_k, block_m, block_n))(q_rows)
    _assert_equal(kernel[0], spec[0], f"backward query tiles {what}")
    _assert_equal(kernel[1], spec[1], f"backward key blocks {what}")
