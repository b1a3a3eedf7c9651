"""Packed sequences: the attention mask given row by row (segment ids, varlen).

`flash_attention(segment_ids=...)` and `flash_attention_varlen` both become one
descriptor, which the kernels read (`cuda/common/segments.h`) and the reference path
applies as it is:
- `q_rows [B, Sq, 4]` int32, per query `{id, first key, end key, interleaved}`: query i
  sees key j iff `first <= j < end` and, where `interleaved`, key j has the same id;
- `kv_rows [B, Sk, 4]` int32, per key `{id, first query, end query, interleaved}`: the
  same rule seen from the key (the backward walks keys).
The window (causal included) and the padding (negative ids, lengths) are folded into the
intervals, so they are the whole mask. `interleaved` marks a row whose id recurs
non-contiguously on the other side, where the interval alone would over-include: the
usual packed documents never need the id comparison.

The tile plans (`forward_plan`, `backward_plans`) say which key blocks each query tile
visits and which of them it sees fully (those run without the mask). They are computed
from the rows for the kernels' tile shapes, without a sort. On the GPU the same arrays come
from small CUDA kernels (`segment_kernels.py`); this module states them, and is the path
everywhere else.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Beyond every position (sequences are at most 2^30 long): the bound of an empty row.
_FAR = 2**30


def rows(q_ids, kv_ids, *, window_left, window_right, q_offsets, kv_offsets):
  """The descriptor: `(q_rows [B, Sq, 4], kv_rows [B, Sk, 4])`, int32.

  q_ids `[B, Sq]`, kv_ids `[B, Sk]`: int32 segment ids, negative for padding.
  q_offsets `[B, Sq]`: query i's diagonal is key `i + q_offsets[i]`; kv_offsets `[B, Sk]`:
  the offset of key j's own sequence (the same rule seen from the key). The window is
  `[diagonal - window_left, diagonal + window_right]`, -1 unbounded.
  """
  q_ids, kv_ids, q_offsets, kv_offsets = _whole_rows(q_ids, kv_ids, q_offsets, kv_offsets)
  return spans(
    q_ids, kv_ids, q_offsets, kv_offsets, window_left=window_left, window_right=window_right
  )


def spans(q_ids, kv_ids, q_offsets, kv_offsets, *, window_left, window_right):
  """`rows` on arrays already whole on each device (`segment_kernels.rows` builds the same
  arrays on the GPU)."""
  seqlen_q, seqlen_k = q_ids.shape[1], kv_ids.shape[1]
  # A window wider than both sequences is none; bounding it keeps the sums in int32.
  window_left = min(window_left, seqlen_q + seqlen_k)
  window_right = min(window_right, seqlen_q + seqlen_k)

  def one_row(q_ids, kv_ids, q_offsets, kv_offsets):
    queries = jnp.arange(seqlen_q, dtype=jnp.int32)
    keys = jnp.arange(seqlen_k, dtype=jnp.int32)
    diagonal = queries + q_offsets
    q_side = _row_spans(
      q_ids,
      kv_ids,
      low=diagonal - window_left if window_left >= 0 else None,
      high=diagonal + window_right + 1 if window_right >= 0 else None,
    )
    # Query i sees key j iff j - offset - window_right <= i <= j - offset + window_left.
    kv_side = _row_spans(
      kv_ids,
      q_ids,
      low=keys - kv_offsets - window_right if window_right >= 0 else None,
      high=keys - kv_offsets + window_left + 1 if window_left >= 0 else None,
    )
    return q_side, kv_side

  return jax.vmap(one_row)(q_ids, kv_ids, q_offsets, kv_offsets)


def _whole_rows(*arrays):
  """The `[B, S]` arrays whole on every device where Explicit mesh axes type them: the
  spans sort and search over the whole row, which JAX refuses on a split sequence, and
  its vmap of the sort fails on a split batch (jax 0.10.2). The ids are O(B S) int32,
  so gathering them costs little next to the attention that reads the rows (which are
  then split like q and k again, by slicing). With Auto axes XLA partitions it itself."""
  sharding = jax.typeof(arrays[0]).sharding
  if AxisType.Explicit not in sharding.mesh.axis_types:
    return arrays
  whole = NamedSharding(sharding.mesh, PartitionSpec())
  return tuple(
    x if jax.typeof(x).sharding.is_fully_replicated else jax.sharding.reshard(x, whole)
    for x in arrays
  )


def _row_spans(ids, other_ids, *, low, high):
  """Each row's `{id, first, end, interleaved}` over the other side's positions: the span of
  its id there, cut to `[low, high)`.

  Without a sort: the other side's runs of one id are hashed by id into a table of slots
  holding the runs' count and their positions' first and end. A slot with one run gives
  that run's span exactly, when it is the row's id (else the id is absent there). A slot
  with more (the id recurs, or two ids share the slot) gives a span holding all of them,
  marked interleaved so the kernels compare ids inside it: exact for any ids, and as fast
  as a run of its own for the usual documents."""
  size = table_slots(other_ids.shape[0])
  runs, slot_first, slot_end = _run_table(other_ids, size)
  slot = _slot(ids, size)
  count, first, end = runs[slot], slot_first[slot], slot_end[slot]
  last_index = other_ids.shape[0] - 1
  same_id = other_ids[jnp.clip(first, 0, last_index)] == ids
  exact = (count == 1) & same_id
  first = first if low is None else jnp.maximum(first, low)
  end = end if high is None else jnp.minimum(end, high)
  sees = (ids >= 0) & ((count > 1) | exact) & (first < end)
  interleaved = sees & ~exact
  zero = jnp.zeros_like(first)
  return jnp.stack(
    [ids, jnp.where(sees, first, zero), jnp.where(sees, end, zero), interleaved.astype(jnp.int32)],
    axis=-1,
  )


def table_slots(other_length):
  """The id table's slot count for a side whose other side has `other_length` positions: the
  power of two at least twice that."""
  return 1 << max(1, 2 * other_length - 1).bit_length()


def _slot(ids, size):
  """A hash of each id into [0, size), size a power of two (Fibonacci hashing)."""
  product = ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
  return (product >> (32 - (size.bit_length() - 1))).astype(jnp.int32)


def _run_table(ids, size):
  """Per slot of `_slot`: how many runs of one non-negative id start there, and the first
  and one-past-last positions of those runs' ids. Only a run's first and last positions
  write (the others go out of range and are dropped), so no two writes wait on one slot
  unless two runs share it."""
  length = ids.shape[0]
  positions = jnp.arange(length, dtype=jnp.int32)
  valid = ids >= 0
  change = ids[1:] != ids[:-1]
  head = valid & jnp.concatenate([jnp.ones((1,), bool), change])
  tail = valid & jnp.concatenate([change, jnp.ones((1,), bool)])
  slot = _slot(ids, size)
  at_head = jnp.where(head, slot, size)
  at_tail = jnp.where(tail, slot, size)
  runs = jnp.zeros((size,), jnp.int32).at[at_head].add(1, mode="drop")
  first = jnp.full((size,), _FAR, jnp.int32).at[at_head].min(positions, mode="drop")
  end = jnp.zeros((size,), jnp.int32).at[at_tail].max(positions + 1, mode="drop")
  return runs, first, end


def visible(q_rows, kv_rows):
  """The dense mask `[B, Sq, Sk]` the rows describe (the reference path's)."""
  keys = jnp.arange(kv_rows.shape[1])[None, None, :]
  in_span = (keys >= q_rows[..., 1:2]) & (keys < q_rows[..., 2:3])
  same_id = q_rows[..., 0:1] == kv_rows[:, None, :, 0]
  return in_span & ((q_rows[..., 3:4] == 0) | same_id)


# --- Tile plans ------------------------------------------------------------------


def forward_plan(q_rows, block_m, block_n):
  """Per tile of `block_m` queries, `{n_min, n_max, right_masked, left_masked}` `[B, tiles, 4]`:
  the key blocks it visits, `[n_min, n_max)`, and of those the ones every query of the tile
  sees whole, `[left_masked, right_masked)` (a KeyBlockRange, cuda/common/block_ranges.h)."""
  tiles = -(-q_rows.shape[1] // block_m)

  def per_tile(x, fill):
    padded = jnp.pad(x, [(0, 0), (0, tiles * block_m - x.shape[1])], constant_values=fill)
    return padded.reshape(x.shape[0], tiles, block_m)

  _, n_min, n_max, right, left = _key_blocks(
    per_tile, q_rows[..., 1], q_rows[..., 2], q_rows[..., 3], block_n, from_first_key=False
  )
  return jnp.stack([n_min, n_max, right, left], axis=-1).astype(jnp.int32)


def _key_blocks(group, first, end, interleaved, block_n, *, from_first_key):
  """The key blocks of each tile of rows: `group(x, fill)` gathers a row array into
  `[..., tiles, rows]`, `fill` past a tile's rows. Blocks are numbered from key 0, or (with
  `from_first_key`) from the tile's first visible key. Returns `(offset, n_min, n_max, right,
  left)`: the keys of block n start at `offset + n * block_n`; the tile visits `[n_min, n_max)`
  and every one of its rows sees `[left, right)` whole."""
  sees = first < end
  lowest = jnp.min(group(jnp.where(sees, first, _FAR), _FAR), axis=-1)
  highest = jnp.max(group(jnp.where(sees, end, 0), 0), axis=-1)
  empty = highest == 0
  offset = jnp.where(empty, 0, lowest) if from_first_key else jnp.zeros_like(lowest)
  n_min = jnp.where(empty, 0, (lowest - offset) // block_n)
  n_max = jnp.where(empty, 0, -(-(highest - offset) // block_n))
  # Keys every row of the tile sees; one that sees none, or needs the id comparison, leaves
  # every block masked (rows past the end of the array do not count).
  whole = sees & (interleaved == 0)
  common_first = jnp.max(group(jnp.where(whole, first, _FAR), 0), axis=-1)
  common_end = jnp.min(group(jnp.where(whole, end, 0), _FAR), axis=-1)
  left = jnp.clip(-(-(common_first - offset) // block_n), n_min, n_max)
  right = jnp.clip((common_end - offset) // block_n, left, n_max)
  none_whole = right <= left
  return (
    offset,
    n_min,
    n_max,
    jnp.where(none_whole, n_min, right),
    jnp.where(none_whole, n_min, left),
  )


def forward_tiles(q_rows, block_m, block_n):
  """The packed forward's query tiles, cut at the documents: `[1 + B * C, 8]` int32.

  Row 0 holds the number of tiles R; rows 1..R hold one tile each, in (batch, query) order:
  `{batch, q_begin, q_end, key_offset, n_blocks, right_masked, left_masked, 0}`. The tile's
  queries `[q_begin, q_end)` (at most block_m) visit the key blocks `[0, n_blocks)`, block n
  being the keys from `key_offset + n * block_n`; of those it sees `[left_masked,
  right_masked)` whole. Every query is in exactly one tile.

  Tiles start every block_m queries from the start of each *stretch*: a run of one id at
  least block_m long, or the queries between two such runs. So a long document's tiles and
  key blocks line up with it, as they would in a call of its own (one masked block on the
  causal diagonal, none at its start), and short documents share tiles.
  C = 3 * ceil(Sq / block_m) + 1 bounds the tiles of a row: a stretch of n queries has at
  most n / block_m + 1 tiles, and there are at most 2 Sq / block_m + 1 stretches."""
  batch, seqlen_q = q_rows.shape[:2]
  capacity = tile_capacity(seqlen_q, block_m)

  def one_row(rows):
    ids, first, end, interleaved = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    queries = jnp.arange(seqlen_q, dtype=jnp.int32)
    run_start = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    run_begin = lax.cummax(jnp.where(run_start, queries, 0))
    next_run = lax.cummin(jnp.where(run_start, queries, seqlen_q), reverse=True)
    run_end = jnp.concatenate([next_run[1:], jnp.array([seqlen_q], jnp.int32)])
    long_run = run_end - run_begin >= block_m
    after_long = jnp.concatenate([jnp.zeros((1,), bool), long_run[:-1]])
    stretch_start = run_start & (long_run | after_long)
    stretch_begin = lax.cummax(jnp.where(stretch_start, queries, 0))
    tile_start = (queries - stretch_begin) % block_m == 0
    count = jnp.sum(tile_start, dtype=jnp.int32)
    # The tiles' first queries, in order: each start writes its own slot.
    slot = jnp.where(tile_start, jnp.cumsum(tile_start, dtype=jnp.int32) - 1, capacity)
    q_begin = jnp.full((capacity,), seqlen_q, jnp.int32).at[slot].set(queries, mode="drop")
    q_end = jnp.concatenate([q_begin[1:], jnp.array([seqlen_q], jnp.int32)])
    # A tile's rows as one line of a [capacity, block_m] gather (past its end: left out).
    index = q_begin[:, None] + jnp.arange(block_m, dtype=jnp.int32)[None]
    inside = index < q_end[:, None]
    take = lambda x, fill: jnp.where(inside, x[jnp.minimum(index, seqlen_q - 1)], fill)
    key_offset, _, n_blocks, right, left = _key_blocks(
      take, first, end, interleaved, block_n, from_first_key=True
    )
    zero = jnp.zeros_like(q_begin)
    return count, jnp.stack([zero, q_begin, q_end, key_offset, n_blocks, right, left, zero], -1)

  counts, tiles = jax.vmap(one_row)(q_rows)
  tiles = tiles.at[..., 0].set(jnp.arange(batch, dtype=jnp.int32)[:, None])
  # The rows' tiles one after another: tile t of row b goes to 1 + offset[b] + t.
  offsets = jnp.cumsum(counts) - counts
  slots = jnp.arange(capacity, dtype=jnp.int32)
  index = jnp.where(
    slots[None] < counts[:, None], 1 + offsets[:, None] + slots[None], batch * capacity + 1
  )
  plan = jnp.zeros((1 + batch * capacity, 8), jnp.int32).at[0, 0].set(jnp.sum(counts))
  return plan.at[index.reshape(-1)].set(tiles.reshape(-1, 8), mode="drop")


def tile_capacity(seqlen_q, block_m):
  """The most tiles `forward_tiles` can cut a row of seqlen_q queries into (its docstring)."""
  return 3 * -(-seqlen_q // block_m) + 1


def backward_plans(q_rows, seqlen_k, block_m, block_n):
  """The backward's plans: per query tile its `forward_plan` in the backward's tiles, and per
  key block `{m_begin, m_end}` `[B, blocks, 2]`, bounds of the query tiles whose plan holds the
  block (the kernel checks each one: the deterministic dQ order needs exactly those)."""
  query_tiles = forward_plan(q_rows, block_m, block_n)
  n_min, n_max = query_tiles[..., 0], query_tiles[..., 1]
  empty = n_max <= n_min
  # m_begin: the first tile whose range could reach block n from below, i.e. the first m
  # with max(n_max[:m+1]) > n; m_end: one past the last m with min(n_min[m:]) <= n.
  reach = lax.cummax(jnp.where(empty, 0, n_max), axis=1)
  start = lax.cummin(jnp.where(empty, _FAR, n_min), axis=1, reverse=True)
  blocks = jnp.arange(-(-seqlen_k // block_n), dtype=jnp.int32)
  # An unrolled binary search: a few fused gathers, where the default loops on the device.
  search = jax.vmap(
    lambda sorted_values: jnp.searchsorted(
      sorted_values, blocks, side="right", method="scan_unrolled"
    )
  )
  key_blocks = jnp.stack([search(reach), search(start)], axis=-1).astype(jnp.int32)
  return query_tiles, key_blocks
