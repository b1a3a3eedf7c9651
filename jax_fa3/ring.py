"""Ring attention: exact attention over a sequence split across devices.

It runs in a manual context (`jax.shard_map`, or the `partition` of `custom_partitioning`),
on the shards of q, k and v split along the sequence over the mesh axes of a `Ring` of P
devices. Device r keeps its query chunk. At step s = 0 ... P-1 it attends to the key/value
chunk of device t = (r - s) mod P while it passes that chunk on to device r + 1 with
`ppermute`. The partial results merge through their log-sum-exps. The backward pass
circulates the key/value chunks again, each with its float32 dK/dV accumulator, which
reaches its owner one hop after the last step; dQ stays where it is.

Every block is one call of the per-device primitives with a static mask. Where the chunks
sit in the sequence enters through `diagonal_offset` and the windows, which depend only on
d = r - t: d = s while the keys come from this device or an earlier one (r >= s), d = s - P
once the ring has wrapped around. A step whose two cases differ branches with `lax.cond`;
a case in which no query sees a key is skipped.

Two layouts place the sequence on the ring (C = local chunk length):
- contiguous: device r holds positions [r C, (r + 1) C). A causal mask leaves it
  unbalanced: at every step after the first, the devices whose keys wrapped around skip
  their block while the others attend to all of it, so a step costs a full block and the
  ring about (P - 1/2) blocks.
- striped: device r holds positions r, r + P, r + 2P, ... Under a causal mask every block
  is a triangle (offset 0 when t <= r, -1 when t > r), so all devices do half a block at
  every step and the ring costs about P/2 blocks: (2P - 1) / P times faster, 1.75x on 4
  devices, 1.875x on 8, minus the cost of restriping. The arrays come and go contiguous,
  restriped by one `all_to_all` each on the way in and out.
"""

import dataclasses

import jax.numpy as jnp
from jax import lax

from jax_fa3 import primitives
from jax_fa3.primitives import AttentionParams


@dataclasses.dataclass(frozen=True)
class Contiguous:
  """Device r holds positions [r * chunk, (r + 1) * chunk) of q's and of k's sequence
  (their chunks may differ in length only where the mask ignores positions)."""

  chunk: int

  def block_mask(self, params: AttentionParams, d: int) -> AttentionParams:
    if params.window_left < 0 and params.window_right < 0:
      return params
    # Query i' of device r is position r C + i', key j' of device t is t C + j'.
    return dataclasses.replace(params, diagonal_offset=params.diagonal_offset + d * self.chunk)

  def local_lengths(self, seqused, owner, chunk):
    """The per-sequence lengths `seqused` as seen by the chunk of device `owner`."""
    return jnp.clip(seqused - owner * chunk, 0, chunk)


@dataclasses.dataclass(frozen=True)
class Striped:
  """Device r holds positions r, r + size, r + 2 size, ... of q's and of k's sequence."""

  size: int

  def block_mask(self, params: AttentionParams, d: int) -> AttentionParams | None:
    # Query i' is position r + P i', key j' is t + P j'. Key j is visible to query i iff
    # i + offset - left <= j <= i + offset + right, i.e. iff j' - i' lies in
    # [ceil((d + offset - left) / P), floor((d + offset + right) / P)].
    shift = d + params.diagonal_offset
    low = None if params.window_left < 0 else -((params.window_left - shift) // self.size)
    high = None if params.window_right < 0 else (shift + params.window_right) // self.size
    if low is None and high is None:
      return params
    if high is None:
      return dataclasses.replace(params, diagonal_offset=low, window_left=0)
    if low is None:
      return dataclasses.replace(params, diagonal_offset=high, window_right=0)
    if low > high:
      return None
    return dataclasses.replace(params, diagonal_offset=high, window_left=high - low, window_right=0)

  def local_lengths(self, seqused, owner, chunk):
    """The per-sequence lengths `seqused` as seen by the chunk of device `owner`."""
    return jnp.clip((seqused - owner + self.size - 1) // self.size, 0, chunk)


@dataclasses.dataclass(frozen=True)
class Ring:
  """The devices a sequence is split over, and how it is laid out on them."""

  axes: tuple[str, ...]  # mesh axes, major to minor
  size: int
  striped: bool

  def layout(self, chunk: int) -> Contiguous | Striped:
    return Striped(self.size) if self.striped else Contiguous(chunk)

  def pass_on(self, arrays, wire_dtype):
    """Sends the arrays to the next device (see `permute`)."""
    return permute(
      arrays, self.axes, [(r, (r + 1) % self.size) for r in range(self.size)], wire_dtype
    )

  def stripe(self, x, axis):
    """Contiguous chunk -> striped chunk along `axis`: position p moves to device p mod P."""
    chunk = x.shape[axis]
    x = x.reshape(*x.shape[:axis], chunk // self.size, self.size, *x.shape[axis + 1 :])
    x = lax.all_to_all(jnp.moveaxis(x, axis + 1, axis), self.axes, axis, axis, tiled=True)
    return x.reshape(*x.shape[:axis], chunk, *x.shape[axis + 2 :])

  def unstripe(self, x, axis):
    """Striped chunk -> contiguous chunk along `axis`: the inverse of `stripe`."""
    chunk = x.shape[axis]
    x = x.reshape(*x.shape[:axis], self.size, chunk // self.size, *x.shape[axis + 1 :])
    x = jnp.moveaxis(lax.all_to_all(x, self.axes, axis, axis, tiled=True), axis, axis + 1)
    return x.reshape(*x.shape[:axis], chunk, *x.shape[axis + 2 :])


def permute(arrays, axes, perm, wire_dtype):
  """`lax.ppermute` of the arrays over `axes` by `perm`, in one ppermute whose operands all
  have `wire_dtype`: wider arrays (float32 accumulators, int32 rows) travel as several words
  of it.

  Once XLA combines collective-permutes, one that mixes float widths fails to verify
  (jax#32148, xla#32845), so every ppermute here carries the input dtype.
  """
  words = [lax.bitcast_convert_type(x, wire_dtype) for x in arrays]
  moved = lax.ppermute(words, axes, perm)
  return [lax.bitcast_convert_type(w, x.dtype) for w, x in zip(moved, arrays)]


def attention_fwd(
  ring: Ring, q, k, v, seqused_q, seqused_k, params: AttentionParams, return_max_logit: bool = False
):
  """The forward on this device's chunks of q, k and v: returns its chunks of (out, lse),
  and with `return_max_logit` the largest score its queries saw, per (batch, head)."""
  if ring.striped:
    q, k, v = (ring.stripe(x, 1) for x in (q, k, v))
  rank = lax.axis_index(ring.axes)
  layout = ring.layout(q.shape[1])
  seqused_q = _local_lengths(layout, seqused_q, rank, q.shape[1])
  out = jnp.zeros((*q.shape[:3], v.shape[3]), jnp.float32)
  lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
  state = (out, lse)
  if return_max_logit:
    state += (jnp.full((q.shape[0], q.shape[2]), -jnp.inf, jnp.float32),)
  for step in range(ring.size):
    if step + 1 < ring.size:
      next_k, next_v = ring.pass_on([k, v], k.dtype)
    block_seqused_k = _local_lengths(layout, seqused_k, (rank - step) % ring.size, k.shape[1])

    def attend(mask, partial, k=k, v=v, seqused_k=block_seqused_k):
      block = primitives.attention_fwd(
        q, k, v, seqused_q, seqused_k, mask, return_max_logit=return_max_logit
      )
      merged = _merge(*partial[:2], *block[:2])
      return (*merged, jnp.maximum(partial[2], block[2])) if return_max_logit else merged

    state = _at_step(ring, layout, params, step, rank, q.shape[1], k.shape[1], attend, state)
    if step + 1 < ring.size:
      k, v = next_k, next_v
  out, lse, *max_logit = state
  out = out.astype(q.dtype)
  if ring.striped:
    out, lse = ring.unstripe(out, 1), ring.unstripe(lse, 2)
  return (out, lse, *max_logit)


def attention_bwd(
  ring: Ring,
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  params: AttentionParams,
  deterministic: bool,
):
  """The backward on this device's chunks, given the global (out, lse): returns (dq, dk, dv)."""
  if ring.striped:
    dout, q, k, v, out = (ring.stripe(x, 1) for x in (dout, q, k, v, out))
    lse = ring.stripe(lse, 2)
  rank = lax.axis_index(ring.axes)
  layout = ring.layout(q.shape[1])
  seqused_q = _local_lengths(layout, seqused_q, rank, q.shape[1])
  grads = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  for step in range(ring.size):
    block_seqused_k = _local_lengths(layout, seqused_k, (rank - step) % ring.size, k.shape[1])

    def differentiate(mask, sums, k=k, v=v, seqused_k=block_seqused_k):
      block_grads = primitives.attention_bwd(
        dout, q, k, v, out, lse, seqused_q, seqused_k, mask, deterministic
      )
      return tuple(total + g.astype(jnp.float32) for total, g in zip(sums, block_grads))

    dq, dk, dv = _at_step(
      ring, layout, params, step, rank, q.shape[1], k.shape[1], differentiate, grads
    )
    if step + 1 < ring.size:
      k, v, dk, dv = ring.pass_on([k, v, dk, dv], k.dtype)
    grads = dq, dk, dv
  dq, (dk, dv) = grads[0], ring.pass_on(grads[1:], k.dtype)  # the last hop: dK/dV home
  dq, dk, dv = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
  if ring.striped:
    dq, dk, dv = (ring.unstripe(x, 1) for x in (dq, dk, dv))
  return dq, dk, dv


def _at_step(ring, layout, params, step, rank, q_len, k_len, visit, state):
  """`visit(mask, state)` for the block this device holds at `step`, with its static mask.

  The block's keys come from this device or an earlier one when rank >= step (d = step),
  from a later one once the ring has wrapped (d = step - P). A block in which no query
  sees a key leaves `state` as it is.
  """

  def case(d):
    mask = layout.block_mask(params, d)
    if mask is None or not _sees_any(mask, q_len, k_len):
      return lambda state: state
    return lambda state: visit(mask, state)

  if step == 0:
    return case(0)(state)
  near, wrapped = layout.block_mask(params, step), layout.block_mask(params, step - ring.size)
  if near == wrapped:
    return case(step)(state)
  return lax.cond(rank >= step, case(step), case(step - ring.size), state)


def _sees_any(mask: AttentionParams, q_len: int, k_len: int) -> bool:
  """Whether any query of a q_len x k_len block sees a key: j - i ranges over
  [-(q_len - 1), k_len - 1] and must lie in [offset - left, offset + right]."""
  low = -q_len + 1 if mask.window_left < 0 else mask.diagonal_offset - mask.window_left
  high = k_len - 1 if mask.window_right < 0 else mask.diagonal_offset + mask.window_right
  return max(low, -q_len + 1) <= min(high, k_len - 1)


def _local_lengths(layout, seqused, owner, chunk):
  """An absent `seqused` (None) stays absent."""
  return None if seqused is None else layout.local_lengths(seqused, owner, chunk)


def _merge(out, lse, block_out, block_lse):
  """Joins attention over two disjoint key sets, each normalized, through their lse.

  A row that has seen no key yet (lse -inf on both sides) stays 0 with lse -inf.
  """
  merged_lse = jnp.logaddexp(lse, block_lse)
  finite = jnp.where(merged_lse == -jnp.inf, 0.0, merged_lse)

  def weight(x):  # [B, H, T] -> [B, T, H, 1]
    return jnp.swapaxes(jnp.exp(x - finite), 1, 2)[..., None]

  return out * weight(lse) + block_out.astype(jnp.float32) * weight(block_lse), merged_lse


# --- Packed sequences (segment ids, varlen) -------------------------------------------
# The rows (segments.py) are the whole mask, window and padding folded in, and their spans
# are positions of the whole row: q_rows' spans are key positions, kv_rows' query positions.
# A block (this device's queries, the visiting chunk's keys) gets those spans cut to the
# positions the other side's chunk holds, as local indices (`block_rows`): with either
# layout the positions of a chunk below a bound are a prefix of it (`local_lengths`, as for
# seqused), so a span [first, end) of the row becomes the span [local(first), local(end)) of
# the chunk, and the block's rows describe exactly the global mask on the block's pairs, for
# any window and any ids (the `interleaved` id comparison reads the ids, which the rows keep).
# The kv rows travel with their K/V chunk; nothing about the mask is static, so each step
# asks at run time whether any query of this device sees a key of the visiting chunk, and
# skips the block (`lax.cond`) if none does: with documents shorter than a chunk, laid out
# contiguously, that is most blocks.


def packed_attention_fwd(
  ring: Ring, q, k, v, q_rows, kv_rows, params: AttentionParams, return_max_logit: bool = False
):
  """The forward on this device's chunks of q, k, v and of the packed-sequence rows
  (positions of the whole row): returns its chunks of (out, lse), and with
  `return_max_logit` the largest score its queries saw. The params' window is already in
  the rows; the params go to each block's call as they are."""
  if ring.striped:
    q, k, v, q_rows, kv_rows = (ring.stripe(x, 1) for x in (q, k, v, q_rows, kv_rows))
  rank = lax.axis_index(ring.axes)
  layout = ring.layout(q.shape[1])
  partial = (
    jnp.zeros((*q.shape[:3], v.shape[3]), jnp.float32),
    jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32),
  )
  if return_max_logit:
    partial += (jnp.full((q.shape[0], q.shape[2]), -jnp.inf, jnp.float32),)
  for step in range(ring.size):
    if step + 1 < ring.size:
      next_chunk = ring.pass_on([k, v, kv_rows], k.dtype)
    block_q_rows, block_kv_rows, sees = _packed_block(
      layout, q_rows, kv_rows, rank, (rank - step) % ring.size
    )

    def attend(partial, k=k, v=v, block_q_rows=block_q_rows, block_kv_rows=block_kv_rows):
      block = primitives.attention_fwd(
        q, k, v, None, None, params, block_q_rows, block_kv_rows, return_max_logit=return_max_logit
      )
      merged = _merge(*partial[:2], *block[:2])
      return (*merged, jnp.maximum(partial[2], block[2])) if return_max_logit else merged

    partial = _unless_empty(step, sees, attend, partial)
    if step + 1 < ring.size:
      k, v, kv_rows = next_chunk
  out, lse = partial[0].astype(q.dtype), partial[1]
  if ring.striped:
    out, lse = ring.unstripe(out, 1), ring.unstripe(lse, 2)
  return (out, lse, *partial[2:])


def packed_attention_bwd(
  ring: Ring, dout, q, k, v, out, lse, q_rows, kv_rows, params: AttentionParams, deterministic: bool
):
  """The backward of `packed_attention_fwd`, given the global (out, lse): returns this
  device's chunks of (dq, dk, dv). The dK/dV accumulators travel with K/V and their rows."""
  if ring.striped:
    dout, q, k, v, out, q_rows, kv_rows = (
      ring.stripe(x, 1) for x in (dout, q, k, v, out, q_rows, kv_rows)
    )
    lse = ring.stripe(lse, 2)
  rank = lax.axis_index(ring.axes)
  layout = ring.layout(q.shape[1])
  dq, dk, dv = (jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
  for step in range(ring.size):
    block_q_rows, block_kv_rows, sees = _packed_block(
      layout, q_rows, kv_rows, rank, (rank - step) % ring.size
    )

    def differentiate(sums, k=k, v=v, block_q_rows=block_q_rows, block_kv_rows=block_kv_rows):
      block_grads = primitives.attention_bwd(
        dout, q, k, v, out, lse, None, None, params, deterministic, block_q_rows, block_kv_rows
      )
      return tuple(total + g.astype(jnp.float32) for total, g in zip(sums, block_grads))

    dq, dk, dv = _unless_empty(step, sees, differentiate, (dq, dk, dv))
    if step + 1 < ring.size:
      k, v, kv_rows, dk, dv = ring.pass_on([k, v, kv_rows, dk, dv], k.dtype)
  dk, dv = ring.pass_on([dk, dv], k.dtype)  # the last hop: dK/dV home
  grads = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
  if ring.striped:
    grads = tuple(ring.unstripe(x, 1) for x in grads)
  return grads


def block_rows(layout, rows, owner, chunk):
  """Rows whose spans are positions of the other side's whole sequence, cut to the chunk
  of `chunk` positions that device `owner` holds of it, in that chunk's local indices.

  Returns the rows and whether any of them sees a position of the chunk. A row that sees
  none gets `first = end = 0` and no `interleaved` flag, as `segments.rows` makes them.
  """
  first, end = (layout.local_lengths(rows[..., field], owner, chunk) for field in (1, 2))
  sees = first < end
  fields = [rows[..., 0]] + [jnp.where(sees, x, 0) for x in (first, end, rows[..., 3])]
  return jnp.stack(fields, axis=-1), jnp.any(sees)


def _unless_empty(step, sees, visit, state):
  """`visit(state)` where the block holds a visible pair (`sees`, known at run time), else
  `state`. The first step's block, the device's own chunk, is always visited: it nearly
  always holds pairs (and an empty one gives nothing), and its results give the state the
  per-device type that both branches of a `lax.cond` must have under shard_map."""
  if step == 0:
    return visit(state)
  return lax.cond(sees, visit, lambda state: state, state)


def _packed_block(layout, q_rows, kv_rows, rank, owner):
  """The rows of the block (this device's queries, the keys of device `owner`) and whether
  any of its pairs is visible (the two sides' rows describe the same pairs)."""
  block_q_rows, sees = block_rows(layout, q_rows, owner, kv_rows.shape[1])
  block_kv_rows, _ = block_rows(layout, kv_rows, rank, q_rows.shape[1])
  return block_q_rows, block_kv_rows, sees
