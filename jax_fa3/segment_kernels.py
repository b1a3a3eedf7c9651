"""segments.py's descriptors built on the GPU.

The rows and tile plans of packed sequences are O(seqlen) integer work; XLA builds them from
segments.py in ~30 small kernels (~44 us for one 16k row, as much as a d64 attention call
on 2k-token documents). Where the extension has them, three small CUDA kernels
(`cuda/plans/`) build the same arrays, entry for entry, in four launches; anywhere else
segments.py does, and it stays what they are checked against.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jax_fa3 import _kernels, segments
from jax_fa3._primitive_rules import define_primitive


def rows(q_ids, kv_ids, *, window_left, window_right, q_offsets, kv_offsets):
  """`segments.rows`: `(q_rows [B, Sq, 4], kv_rows [B, Sk, 4])`."""
  q_ids, kv_ids, q_offsets, kv_offsets = segments._whole_rows(q_ids, kv_ids, q_offsets, kv_offsets)
  return rows_p.bind(
    q_ids, kv_ids, q_offsets, kv_offsets, window_left=window_left, window_right=window_right
  )


def forward_tiles(q_rows, block_m, block_n):
  """`segments.forward_tiles`, on one device's arrays inside a CUDA lowering."""
  if not _has(_kernels.FORWARD_TILES_TARGET):
    return segments.forward_tiles(q_rows, block_m, block_n)
  batch, seqlen_q = q_rows.shape[:2]
  capacity = segments.tile_capacity(seqlen_q, block_m)
  # Per row: its tiles' bounds, run and stretch starts, count, and each block of 256
  # queries' run starts and their count, 16-byte aligned (cuda/plans/params.h).
  blocks = -(-seqlen_q // 256)
  row = 2 * capacity + 2 * (seqlen_q + 1) + 1 + blocks * 257
  workspace = batch * -(-row // 4) * 4
  plan, _ = jax.ffi.ffi_call(
    _kernels.FORWARD_TILES_TARGET,
    (
      jax.ShapeDtypeStruct((1 + batch * capacity, 8), jnp.int32),
      jax.ShapeDtypeStruct((4 * workspace,), jnp.uint8),
    ),
  )(q_rows, block_m=int(block_m), block_n=int(block_n))
  return plan


def backward_plans(q_rows, seqlen_k, block_m, block_n):
  """`segments.backward_plans`, on one device's arrays inside a CUDA lowering."""
  if not _has(_kernels.BACKWARD_PLANS_TARGET):
    return segments.backward_plans(q_rows, seqlen_k, block_m, block_n)
  batch, seqlen_q = q_rows.shape[:2]
  tiles = -(-seqlen_q // block_m)
  query_tiles, key_blocks, _ = jax.ffi.ffi_call(
    _kernels.BACKWARD_PLANS_TARGET,
    (
      jax.ShapeDtypeStruct((batch, tiles, 4), jnp.int32),
      jax.ShapeDtypeStruct((batch, -(-seqlen_k // block_n), 2), jnp.int32),
      jax.ShapeDtypeStruct((4 * batch * 2 * tiles,), jnp.uint8),
    ),
  )(q_rows, block_m=int(block_m), block_n=int(block_n))
  return query_tiles, key_blocks


def _has(target):
  return target in _kernels.kernels_available().targets


def _rows_cuda(q_ids, kv_ids, q_offsets, kv_offsets, *, window_left, window_right):
  if not _has(_kernels.SEGMENT_ROWS_TARGET):
    return segments.spans(
      q_ids, kv_ids, q_offsets, kv_offsets, window_left=window_left, window_right=window_right
    )
  (batch, seqlen_q), seqlen_k = q_ids.shape, kv_ids.shape[1]
  workspace = batch * 3 * (segments.table_slots(seqlen_k) + segments.table_slots(seqlen_q))
  q_rows, kv_rows, _ = jax.ffi.ffi_call(
    _kernels.SEGMENT_ROWS_TARGET,
    (
      jax.ShapeDtypeStruct((batch, seqlen_q, 4), jnp.int32),
      jax.ShapeDtypeStruct((batch, seqlen_k, 4), jnp.int32),
      jax.ShapeDtypeStruct((4 * workspace,), jnp.uint8),
    ),
  )(
    q_ids,
    kv_ids,
    q_offsets,
    kv_offsets,
    window_left=int(window_left),
    window_right=int(window_right),
  )
  return q_rows, kv_rows


def _rows_abstract_eval(q_ids, kv_ids, q_offsets, kv_offsets, **params):
  del q_offsets, kv_offsets, params

  def with_four(ids):
    spec = ids.sharding.spec
    sharding = ids.sharding.update(spec=PartitionSpec(*spec, *[None] * (2 - len(spec)), None))
    return ids.update(shape=(*ids.shape, 4), sharding=sharding)

  return with_four(q_ids), with_four(kv_ids)


rows_p = define_primitive("fa3_segment_rows", _rows_abstract_eval, segments.spans, _rows_cuda)
