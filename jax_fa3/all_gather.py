"""All-gather attention: exact attention over a sequence split across devices, each device
holding the whole K/V for the time of the call.

It runs where ring.py does (a manual context over the mesh axes a `Gather` names), on the
same shards: device r keeps its query chunk, gathers K and V (and the packed rows of the
keys) whole in one `all_gather`, and attends to them in one call whose mask is moved to
its queries' place in the sequence. Nothing is merged and nothing travels while it
computes. The backward gives dQ of its own queries and a part of dK/dV for every key; one
`psum_scatter`, in float32, sums the parts and leaves each device the chunk it owns.

Against the ring: one collective each way instead of P hops, no lse merges, one or two
kernel calls instead of P; but each device holds the whole K/V (and in the backward its
float32 dK/dV), and the gather is not hidden behind attention as the ring's hops are. It
pays where the K/V chunks are small next to the ring's per-step costs: short sequences,
many devices, few k/v heads (strategy.py weighs the two).

Two layouts place the queries (C = the local query chunk):
- contiguous: device r holds positions [r C, (r + 1) C) and makes one call, its diagonal
  offset moved by r C. Balanced without a mask, under a band (a window bounded on both
  sides), and for packed documents shorter than a chunk.
- zigzag, for a mask bounded on one side (causal): the sequence cut in 2P halves of C / 2,
  device r holds halves r and 2P - 1 - r, an early one and a late one, so that every device
  does the same share of the triangle. Two calls, their outputs side by side, no merge.
  (The ring's striped layout balances too, but a striped query's visible keys grow by P
  positions per query, which no call with a band mask can express: it would take a call
  per K/V chunk and P - 1 merges, the ring's work without its hops.) The halves move by two
  ppermutes on the way in and two on the way out.
The kernels take the mask's offsets as static attributes, and they depend on the device:
a mask that depends on positions runs under `lax.switch` on the device's index, one branch
per device with its own offsets. Lengths and packed rows are data and need no branch.
"""

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from jax_fa3 import primitives, ring
from jax_fa3.primitives import AttentionParams


@dataclasses.dataclass(frozen=True)
class Gather:
  """The devices a sequence is split over (mesh axes, major to minor), and whether the
  queries sit on them in the zigzag layout."""

  axes: tuple[str, ...]
  size: int
  zigzag: bool

  def gather(self, arrays, wire_dtype):
    """The arrays whole along their sequence (axis 1), gathered as words of `wire_dtype`
    (the input dtype, as every collective of the ring: see ring.permute)."""
    words = [lax.bitcast_convert_type(x, wire_dtype) for x in arrays]
    whole = lax.all_gather(words, self.axes, axis=1, tiled=True)
    return [lax.bitcast_convert_type(w, x.dtype) for w, x in zip(whole, arrays)]

  def scatter_sum(self, arrays):
    """Each float32 array (sequence on axis 1) summed over the devices, each keeping its own
    chunk of the sum."""
    return lax.psum_scatter(arrays, self.axes, scatter_dimension=1, tiled=True)

  def pieces(self, rank, length):
    """(chunk index, chunk length) of each run of a device's `length` queries, in local
    order: the whole chunk; zigzag, the even-numbered half first (as `to_zigzag` leaves
    them), which needs `rank` to be an int."""
    if not self.zigzag:
      return [(rank, length)]
    mirror = 2 * self.size - 1 - rank
    halves = [(rank, length // 2), (mirror, length // 2)]
    return halves if rank % 2 == 0 else halves[::-1]

  def to_zigzag(self, arrays_and_axes, wire_dtype):
    """Contiguous chunks -> this device's two zigzag halves, the even-numbered one first.
    `arrays_and_axes`: (array, its sequence axis) pairs."""
    return self._exchange(arrays_and_axes, wire_dtype, inverse=False)

  def from_zigzag(self, arrays_and_axes, wire_dtype):
    """The inverse of `to_zigzag`."""
    return self._exchange(arrays_and_axes, wire_dtype, inverse=True)

  def _exchange(self, arrays_and_axes, wire_dtype, inverse):
    # Half chunk c (of 2P) sits on device c // 2 when contiguous, on `home(c)` in zigzag;
    # the first halves (c = 2d, even) go by one ppermute, the second ones by another.
    home = lambda c: c if c < self.size else 2 * self.size - 1 - c
    moved = []
    for half in (0, 1):
      perm = [(d, home(2 * d + half)) for d in range(self.size)]
      perm = [(b, a) for a, b in perm] if inverse else perm
      halves = [_half(x, axis, half) for x, axis in arrays_and_axes]
      moved.append(ring.permute(halves, self.axes, perm, wire_dtype))
    return [
      jnp.concatenate([first, second], axis)
      for (first, second), (_, axis) in zip(zip(*moved), arrays_and_axes)
    ]


def _half(x, axis, which):
  length = x.shape[axis] // 2
  return lax.slice_in_dim(x, which * length, (which + 1) * length, axis=axis)


def attention_fwd(
  gather: Gather,
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  params: AttentionParams,
  q_rows=None,
  kv_rows=None,
  sinks=None,
  return_max_logit: bool = False,
):
  """The forward on this device's chunks of q, k, v (and of the packed rows, whose spans
  are positions of the whole row): returns its chunks of (out, lse), and with
  `return_max_logit` the largest score its queries saw. `sinks` join every row's softmax."""
  packed = q_rows is not None
  k, v, *kv_rows = gather.gather([k, v, *_listed(kv_rows)], k.dtype)
  q_rows = _listed(q_rows)
  if gather.zigzag:
    q, *q_rows = gather.to_zigzag([(q, 1), *((x, 1) for x in q_rows)], q.dtype)
  q_rows, kv_rows = _unlisted(q_rows), _unlisted(kv_rows)

  def attend(rank, q, k, v, q_rows, kv_rows):
    results = []
    for piece in _pieces(gather, params, rank, q.shape[1], seqused_q, q_rows, kv_rows):
      results.append(
        primitives.attention_fwd(
          _slice(q, piece.start, piece.length),
          k,
          v,
          piece.seqused_q,
          seqused_k,
          piece.mask,
          piece.q_rows,
          piece.kv_rows,
          sinks=sinks,
          return_max_logit=return_max_logit,
        )
      )
    out = jnp.concatenate([r[0] for r in results], axis=1)
    lse = jnp.concatenate([r[1] for r in results], axis=2)
    if not return_max_logit:
      return out, lse
    return out, lse, functools.reduce(jnp.maximum, [r[2] for r in results])

  out, lse, *max_logit = _on_this_device(gather, params, packed, attend, q, k, v, q_rows, kv_rows)
  if gather.zigzag:
    out, lse = gather.from_zigzag([(out, 1), (lse, 2)], out.dtype)
  if return_max_logit:
    return out, lse, lax.pmax(max_logit[0], gather.axes)
  return out, lse


def attention_bwd(
  gather: Gather,
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
  q_rows=None,
  kv_rows=None,
  sinks=None,
):
  """The backward on this device's chunks, given the global (out, lse): returns (dq, dk, dv),
  and dsinks (summed over the devices) with sinks."""
  packed = q_rows is not None
  k_chunk, v_chunk = k, v
  k, v, *kv_rows = gather.gather([k, v, *_listed(kv_rows)], k.dtype)
  q_rows = _listed(q_rows)
  if gather.zigzag:
    query_side = [(dout, 1), (q, 1), (out, 1), (lse, 2), *((x, 1) for x in q_rows)]
    dout, q, out, lse, *q_rows = gather.to_zigzag(query_side, q.dtype)
  q_rows, kv_rows = _unlisted(q_rows), _unlisted(kv_rows)

  def differentiate(rank, dout, q, k, v, out, lse, q_rows, kv_rows):
    dq, dk, dv, dsinks = [], 0.0, 0.0, 0.0
    for piece in _pieces(gather, params, rank, q.shape[1], seqused_q, q_rows, kv_rows):
      rows = functools.partial(_slice, start=piece.start, length=piece.length)
      grads = primitives.attention_bwd(
        rows(dout),
        rows(q),
        k,
        v,
        rows(out),
        _slice(lse, piece.start, piece.length, axis=2),
        piece.seqused_q,
        seqused_k,
        piece.mask,
        deterministic,
        piece.q_rows,
        piece.kv_rows,
        sinks=sinks,
      )
      dq.append(grads[0])
      dk, dv = dk + grads[1].astype(jnp.float32), dv + grads[2].astype(jnp.float32)
      dsinks = dsinks + grads[3] if sinks is not None else dsinks
    return (jnp.concatenate(dq, axis=1), dk, dv) + ((dsinks,) if sinks is not None else ())

  dq, dk, dv, *dsinks = _on_this_device(
    gather, params, packed, differentiate, dout, q, k, v, out, lse, q_rows, kv_rows
  )
  if gather.zigzag:
    (dq,) = gather.from_zigzag([(dq, 1)], dq.dtype)
  dk, dv = gather.scatter_sum([dk, dv])
  grads = (dq, dk.astype(k_chunk.dtype), dv.astype(v_chunk.dtype))
  return grads + tuple(lax.psum(x, gather.axes) for x in dsinks)


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One run of a device's queries and what its call needs: where it sits in the local
  arrays, its mask, lengths and rows."""

  start: int
  length: int
  mask: AttentionParams
  seqused_q: object
  q_rows: object
  kv_rows: object


def _pieces(gather, params, rank, length, seqused_q, q_rows, kv_rows):
  """The runs of this device's queries (`gather.pieces`), each with its call's operands."""
  pieces, start = [], 0
  for chunk, chunk_length in gather.pieces(rank, length):
    pieces.append(_piece(start, chunk, chunk_length, params, seqused_q, q_rows, kv_rows))
    start += chunk_length
  return pieces


def _piece(start, chunk, length, params, seqused_q, q_rows, kv_rows):
  """The run of `length` queries at `start` in the local arrays, chunk `chunk` of the
  sequence's chunks of `length`: its mask moved to its place (queries at chunk * length + i,
  keys from 0) and its lengths cut to it; packed, the rows (which hold the whole mask) of
  its queries, and the gathered keys' rows cut to those queries."""
  layout = ring.Contiguous(length)
  if q_rows is not None:
    own_kv_rows, _ = ring.block_rows(layout, kv_rows, chunk, length)
    return _Piece(start, length, params, None, _slice(q_rows, start, length), own_kv_rows)
  own_lengths = None if seqused_q is None else layout.local_lengths(seqused_q, chunk, length)
  return _Piece(start, length, layout.block_mask(params, chunk), own_lengths, None, None)


def _on_this_device(gather, params, packed, program, *operands):
  """`program(rank, *operands)` for this device's index: an int, one `lax.switch` branch per
  device, where the mask's offsets or the zigzag halves depend on it; else the traced index."""
  rank = lax.axis_index(gather.axes)
  unmasked = params.window_left < 0 and params.window_right < 0
  if not gather.zigzag and (packed or unmasked):
    return program(rank, *operands)
  branches = [functools.partial(program, r) for r in range(gather.size)]
  return lax.switch(rank, branches, *operands)


def _listed(x):
  """An optional array as a list of none or one."""
  return [] if x is None else [x]


def _unlisted(xs):
  return xs[0] if xs else None


def _slice(x, start, length, axis=1):
  if start == 0 and length == x.shape[axis]:
    return x
  return lax.slice_in_dim(x, start, start + length, axis=axis)
