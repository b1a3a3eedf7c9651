"""The packed forward's query tiles (segments.forward_tiles) against brute force: every query
in exactly one tile, every visible pair visited, no partly masked block run unmasked, long
documents tiled as a call of their own would tile them, and the static capacity enough for
the worst layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

from documents import random_documents
from jax_fa3 import segments


def _rows(q_ids, kv_ids, window):
  sq, sk = len(q_ids), len(kv_ids)
  offset = sk - sq
  return segments.rows(
    jnp.asarray(q_ids)[None],
    jnp.asarray(kv_ids)[None],
    window_left=window[0],
    window_right=window[1],
    q_offsets=jnp.full((1, sq), offset, jnp.int32),
    kv_offsets=jnp.full((1, sk), offset, jnp.int32),
  )


def _tiles(q_rows, block_m, block_n):
  plan = np.asarray(segments.forward_tiles(q_rows, block_m, block_n))
  batch, seqlen_q = q_rows.shape[:2]
  assert plan.shape == (1 + batch * (3 * -(-seqlen_q // block_m) + 1), 8)
  return plan[1 : 1 + plan[0, 0]]


def _check(q_ids, kv_ids, window, block_m, block_n):
  q_rows, kv_rows = _rows(q_ids, kv_ids, window)
  visible = np.asarray(segments.visible(q_rows, kv_rows))[0]
  sk = len(kv_ids)
  tiles = _tiles(q_rows, block_m, block_n)
  covered = np.zeros(len(q_ids), int)
  for batch, q_begin, q_end, key_offset, n_blocks, right, left, _ in tiles:
    assert batch == 0 and 0 <= q_begin < q_end <= q_begin + block_m
    covered[q_begin:q_end] += 1
    rows = visible[q_begin:q_end]
    visited = np.zeros(sk, bool)
    visited[key_offset : key_offset + n_blocks * block_n] = True
    assert not (rows & ~visited[None]).any(), f"tile {q_begin}:{q_end} misses a visible pair"
    assert 0 <= left <= right <= n_blocks
    for n in range(left, right):
      keys = slice(key_offset + n * block_n, key_offset + (n + 1) * block_n)
      assert key_offset + (n + 1) * block_n <= sk and rows[:, keys].all(), (
        f"tile {q_begin}:{q_end} runs block {n} unmasked"
      )
  np.testing.assert_array_equal(covered, 1)
  return tiles


@pytest.mark.parametrize("seed", range(16))
def test_tiles_cover_every_query_once_and_every_visible_pair(seed):
  rng = np.random.default_rng(seed)
  sq = int(rng.integers(1, 700))
  sk = sq if seed % 3 else int(rng.integers(1, 700))
  block_m, block_n = [(64, 64), (128, 128), (192, 128), (128, 80), (64, 128)][seed % 5]
  q_ids = random_documents(rng, sq, int(rng.integers(1, 300)))
  kv_ids = q_ids if sk == sq else random_documents(rng, sk, int(rng.integers(1, 300)))
  if seed % 4 == 1:
    q_ids[::7] = q_ids[0]  # recurring ids
  if seed % 5 == 2:
    q_ids[-int(rng.integers(1, 40)) :] = -1  # padding
  window = [(-1, -1), (-1, 0), (17, 3), (0, -1)][seed % 4]
  _check(q_ids, kv_ids, window, block_m, block_n)


def test_long_documents_are_tiled_as_calls_of_their_own():
  lengths = [300, 40, 20, 1000, 129]
  ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
  tiles = _check(ids, ids, (-1, 0), 128, 128)
  starts = [int(t[1]) for t in tiles]
  # 300: 0, 128, 256; the short 40 + 20 share one tile; 1000 from 360 on; 129 from 1360.
  assert starts == [0, 128, 256, 300, 360, 488, 616, 744, 872, 1000, 1128, 1256, 1360, 1488]
  for _, q_begin, q_end, key_offset, n_blocks, right, left, _ in tiles:
    if 360 <= q_begin < 1360:  # causal in the long document: blocks from its start, one masked
      assert key_offset == 360 and n_blocks == (q_end - 360 + 127) // 128
      assert (left, right) == (0, n_blocks - 1)


@pytest.mark.parametrize("block_m", [64, 128, 192])
def test_capacity_holds_the_worst_layouts(block_m):
  # Runs one query longer than a tile, one query apart: the most tiles per query.
  pattern = []
  while len(pattern) < 4 * block_m + 50:
    pattern += [len(pattern)] * (block_m + 1) + [len(pattern) + 1]
  for ids in (np.array(pattern, np.int32), np.arange(700, dtype=np.int32)):
    _check(ids, ids, (-1, -1), block_m, 128)
