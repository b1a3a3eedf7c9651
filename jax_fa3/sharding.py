"""Attention on a device mesh: batch and heads split locally, the sequence as a ring or by
all-gathering K/V.

`flash_attention` and `dot_product_attention` take sharded arrays under `jax.jit` as they
are, and `choose_split` decides how each call runs:
- a split batch or split heads stay split, with no communication; k/v heads follow the
  grouping of q's heads (GQA), and where there are more head shards than k/v heads each
  device slices the one k/v head its query heads read;
- a split sequence runs as ring attention (`ring.py`, striped for causal masks) or as
  all-gather attention (`all_gather.py`, zigzag for causal masks), whichever
  `strategy.plan` finds cheaper, or the one the caller forces;
- whatever cannot be split that way (a split head dim, a sequence length the devices
  cannot divide) is gathered first.

How: the custom VJP in attention.py binds `fwd_p` and `bwd_p` ("fa3_fwd", "fa3_bwd"), which
are the per-device primitives of primitives.py lifted to a mesh. They have those
primitives' abstract evaluation and batching rule, so vmap and grad work as before.
- Mesh axes of type Auto: they lower through `custom_partitioning`. Its Shardy rule
  propagates shardings; its `partition` picks the split from the shardings Shardy chose
  and runs `local_fwd` or `local_bwd` on each device's shards.
- Explicit axes: the arrays' types carry their shardings, so the same per-device program
  runs under `jax.shard_map`, set up at trace time by `attention_fwd` and `attention_bwd`.
Inside `jax.shard_map` the arrays are the local shards along its manual axes, and
attention runs on them as on one device.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla
from jax.interpreters.mlir import ir
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_fa3 import _primitive_rules, all_gather, primitives, reference, ring, strategy
from jax_fa3.primitives import AttentionParams


@dataclasses.dataclass(frozen=True)
class Split:
  """The mesh axes that split each dimension of one attention call.

  q, dout, out: [batch, sequence, heads, -]; k, v: [batch, sequence, heads or -, -] (heads
  when `kv_heads_split`); lse: [batch, heads, sequence]; seqused: [batch]; the packed
  sequences' rows: [batch, sequence, -] (their spans stay positions of the whole row: the
  ring cuts them to each block, ring.block_rows).
  """

  batch: tuple[str, ...] = ()
  sequence: tuple[str, ...] = ()
  heads: tuple[str, ...] = ()
  kv_heads_split: bool = True  # else each device slices the k/v head its q heads read
  strategy: str = "ring"  # how the split sequence runs: "ring" or "all_gather"
  striped: bool = False  # the ring's layout (see ring.py)
  zigzag: bool = False  # all-gather's layout (see all_gather.py)
  # Why the sequence runs so (or stays whole), for people: strategy.plan's reason.
  reason: str = dataclasses.field(default="", compare=False)

  @property
  def axes(self) -> frozenset[str]:
    return frozenset(self.batch + self.sequence + self.heads)

  def q_spec(self):
    return PartitionSpec(_entry(self.batch), _entry(self.sequence), _entry(self.heads), None)

  def kv_spec(self):
    heads = self.heads if self.kv_heads_split else ()
    return PartitionSpec(_entry(self.batch), _entry(self.sequence), _entry(heads), None)

  def lse_spec(self):
    return PartitionSpec(_entry(self.batch), _entry(self.heads), _entry(self.sequence))

  def seqused_spec(self, seqused):
    """Absent seqused arrays (shape [0]) are replicated."""
    return PartitionSpec(_entry(self.batch) if seqused.shape[0] else None)

  def rows_spec(self, rows):
    """Absent rows (shape [0]) are replicated."""
    if rows.ndim != 3:
      return PartitionSpec(None)
    return PartitionSpec(_entry(self.batch), _entry(self.sequence), None)

  def per_head_spec(self, x=None):
    """[batch, heads] arrays (sinks, max_logit, dsinks); an absent one (shape [0]) is replicated."""
    if x is not None and x.ndim != 2:
      return PartitionSpec(None)
    return PartitionSpec(_entry(self.batch), _entry(self.heads))

  def descale_spec(self, x, of_kv_heads):
    """The FP8 descales: [batch, heads, blocks] (descale_q), [batch, kv_heads, blocks]
    (descale_k) and [batch, kv_heads] (descale_v, `of_kv_heads`), split with q's or k's
    heads; an absent one (shape [0]) is replicated."""
    if len(x.shape) == 1:
      return PartitionSpec(None)
    heads = self.heads if self.kv_heads_split or not of_kv_heads else ()
    return PartitionSpec(_entry(self.batch), _entry(heads), *[None] * (len(x.shape) - 2))

  def descale_specs(self, descale_q, descale_k, descale_v):
    return (
      self.descale_spec(descale_q, False),
      self.descale_spec(descale_k, True),
      self.descale_spec(descale_v, True),
    )


# Packed sequences on a ring: the layout. The ring takes both (ring.packed_attention_fwd:
# the rows are cut to each block exactly, and a block with no visible pair is skipped at run
# time), but only the contiguous one pays for the usual packed rows: documents shorter
# than a chunk then sit inside one or two chunks, so under a causal (or no) mask most
# blocks hold no pair and are skipped, and each device's own block is balanced by the
# documents themselves (about equal work per chunk). Striped, every document spreads over
# all devices: no block can be skipped, and the arrays are restriped on the way in and out.
# Striping would pay only for documents about as long as the row under a causal mask, which
# the split cannot see (the ids are traced). Packed sequences run all-gathered unless the
# caller forces the ring (context_parallel="ring"; strategy.plan says why).
_PACKED_STRIPED = False


def choose_split(
  axis_sizes,
  q_spec,
  k_spec,
  q_shape,
  k_shape,
  params: AttentionParams,
  packed: bool = False,
  fp8: bool = False,
  context_parallel: str = "auto",
) -> Split:
  """How to run attention on q and k sharded as `q_spec` and `k_spec` over a mesh of
  `axis_sizes` ({axis name: size}).

  Each dimension keeps the mesh axes q is split over, or else those k is split over (q is
  then sliced, which costs no communication), provided they divide it. The heads stay
  split if the k/v heads can follow: when their count is a multiple of the shards, or a
  divisor, in which case each device slices the one k/v head it needs. The sequence stays
  split if the shards divide both lengths; `strategy.plan` then says how it runs
  ("auto": ring or all-gather by its cost model; "ring" or "all_gather" forced) and why
  (the result's `reason`). Packed sequences (`packed`: segment ids, varlen) run contiguous.
  FP8 inputs (`fp8`) have neither: a split sequence raises a ValueError.
  """
  batch, seqlen_q, heads, _ = q_shape
  _, seqlen_k, kv_heads, _ = k_shape
  taken = set()
  pick = functools.partial(_pick, axis_sizes, taken)

  q_axes, k_axes = _axes_by_dimension(q_spec), _axes_by_dimension(k_spec)
  split_batch = pick([q_axes[0], k_axes[0]], batch)
  split_heads = pick([q_axes[2], k_axes[2]], heads)
  head_shards = math.prod(axis_sizes[a] for a in split_heads)
  if kv_heads % head_shards and head_shards % kv_heads:
    taken -= set(split_heads)
    split_heads, head_shards = (), 1
  sequence = pick([q_axes[1], k_axes[1]], seqlen_q, seqlen_k)
  if fp8 and sequence:
    raise ValueError(
      f"jax_fa3: float8_e4m3fn attention does not run as ring attention: q and k are split "
      f"over their sequence by mesh axes {sequence} (q {_spec_text(q_spec)}, k "
      f"{_spec_text(k_spec)}), and it has no all-gather form either. Keep the sequence "
      f"whole (split the batch or the heads), or run this call in bfloat16."
    )
  plan = strategy.Plan("ring", reason="no sequence split: each device holds whole sequences")
  if sequence:
    plan = strategy.plan(
      math.prod(axis_sizes[a] for a in sequence),
      q_shape,
      k_shape,
      params,
      packed=packed,
      context_parallel=context_parallel,
      packed_striped=_PACKED_STRIPED,
    )
  return Split(
    batch=split_batch,
    sequence=sequence,
    heads=split_heads,
    kv_heads_split=kv_heads % head_shards == 0,
    strategy=plan.strategy,
    striped=plan.striped,
    zigzag=plan.zigzag,
    reason=plan.reason,
  )


def _spec_text(spec):
  return "P(" + ", ".join(repr(entry) for entry in spec) + ")"


def _pick(axis_sizes, taken, candidates, *sizes):
  """The first candidate tuple of mesh axes not yet `taken` whose shard count (> 1) divides
  every size; it is then taken. () if none."""
  for axes in candidates:
    shards = math.prod(axis_sizes[a] for a in axes)
    if shards > 1 and not taken & set(axes) and all(s % shards == 0 for s in sizes):
      taken.update(axes)
      return axes
  return ()


def local_fwd(
  split: Split,
  axis_sizes,
  params: AttentionParams,
  return_max_logit,
  fp8,
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows=None,
  kv_rows=None,
  sinks=None,
  descale_q=None,
  descale_k=None,
  descale_v=None,
):
  """The forward on one device's shards, split as `split`: returns (out, lse), and
  max_logit with `return_max_logit`. `fp8` (primitives.Fp8Params or None) and the
  descales are the FP8 forward's, which choose_split never splits by sequence."""
  seqused_q, seqused_k = primitives.none_if_absent(seqused_q), primitives.none_if_absent(seqused_k)
  sinks = primitives.none_if_absent(sinks)
  k, v = (_kv_head_of_device(split, axis_sizes, x) for x in (k, v))
  if not split.sequence:
    descale_k, descale_v = (
      _kv_head_of_device(split, axis_sizes, x, axis=1) for x in _present(descale_k, descale_v)
    )
    return tuple(
      primitives.attention_fwd(
        q,
        k,
        v,
        seqused_q,
        seqused_k,
        params,
        *_present(q_rows, kv_rows),
        sinks=sinks,
        return_max_logit=return_max_logit,
        descales=(primitives.none_if_absent(descale_q), descale_k, descale_v),
        fp8=fp8,
      )
    )
  if split.strategy == "all_gather":
    return all_gather.attention_fwd(
      _gather(split, axis_sizes),
      q,
      k,
      v,
      seqused_q,
      seqused_k,
      params,
      *_present(q_rows, kv_rows),
      sinks=sinks,
      return_max_logit=return_max_logit,
    )
  the_ring = _ring(split, axis_sizes)
  if primitives.none_if_absent(q_rows) is not None:
    out, lse, *max_logit = ring.packed_attention_fwd(
      the_ring, q, k, v, q_rows, kv_rows, params, return_max_logit=return_max_logit
    )
  else:
    out, lse, *max_logit = ring.attention_fwd(
      the_ring, q, k, v, seqused_q, seqused_k, params, return_max_logit=return_max_logit
    )
  if sinks is not None:  # once, after the ring's merge
    out, lse = _with_sinks(out, lse, sinks, seqused_q, lax.axis_index(the_ring.axes))
  return (out, lse, lax.pmax(max_logit[0], the_ring.axes)) if return_max_logit else (out, lse)


def _with_sinks(out, lse, sinks, seqused_q, rank):
  """reference.with_sinks on this device's contiguous chunk: rows past seqused_q
  (positions rank * chunk + i) stay -inf, as the kernels leave them."""
  rows = None
  if seqused_q is not None:
    rows = (rank * lse.shape[2] + jnp.arange(lse.shape[2]) < seqused_q[:, None])[:, None]
  return reference.with_sinks(out, lse, sinks, rows)


def local_bwd(
  split: Split,
  axis_sizes,
  params: AttentionParams,
  deterministic,
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  q_rows=None,
  kv_rows=None,
  sinks=None,
):
  """The backward on one device's shards, split as `split`: returns (dq, dk, dv), and
  dsinks with sinks."""
  seqused_q, seqused_k = primitives.none_if_absent(seqused_q), primitives.none_if_absent(seqused_k)
  sinks = primitives.none_if_absent(sinks)
  kv_heads = k.shape[2]
  k, v = (_kv_head_of_device(split, axis_sizes, x) for x in (k, v))
  dsinks = ()
  if split.strategy == "all_gather" and split.sequence:
    dq, dk, dv, *dsinks = all_gather.attention_bwd(
      _gather(split, axis_sizes),
      dout,
      q,
      k,
      v,
      out,
      lse,
      seqused_q,
      seqused_k,
      params,
      deterministic,
      *_present(q_rows, kv_rows),
      sinks=sinks,
    )
  elif split.sequence:
    the_ring = _ring(split, axis_sizes)
    # The lse holds the sink, so the ring's gradients need nothing more; the sinks' own
    # gradient sums over every row of the sequence.
    if primitives.none_if_absent(q_rows) is not None:
      dq, dk, dv = ring.packed_attention_bwd(
        the_ring, dout, q, k, v, out, lse, q_rows, kv_rows, params, deterministic
      )
    else:
      dq, dk, dv = ring.attention_bwd(
        the_ring, dout, q, k, v, out, lse, seqused_q, seqused_k, params, deterministic
      )
    if sinks is not None:
      delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
      dsinks = (
        lax.psum(reference.sink_gradient(sinks, lse, jnp.swapaxes(delta, 1, 2)), the_ring.axes),
      )
  else:
    dq, dk, dv, *dsinks = primitives.attention_bwd(
      dout,
      q,
      k,
      v,
      out,
      lse,
      seqused_q,
      seqused_k,
      params,
      deterministic,
      *_present(q_rows, kv_rows),
      sinks=sinks,
    )
  if split.heads and not split.kv_heads_split:
    # Each device holds a part of the gradient of its k/v head: place it, sum in float32.
    index = _kv_head_index(split, axis_sizes, kv_heads)

    def sum_over_heads(grad):
      placed = lax.dynamic_update_slice_in_dim(
        lax.full((*grad.shape[:2], kv_heads, grad.shape[3]), 0, jnp.float32),
        grad.astype(jnp.float32),
        index,
        2,
      )
      return lax.psum(placed, split.heads).astype(grad.dtype)

    dk, dv = sum_over_heads(dk), sum_over_heads(dv)
  return (dq, dk, dv, *dsinks)


def _present(*operands):
  return tuple(primitives.none_if_absent(x) for x in operands)


def _kv_head_of_device(split, axis_sizes, x, axis=2):
  """k or v (or an FP8 descale of theirs, heads on `axis` 1) as the device's query heads read
  it: the one head they share when the k/v heads are fewer than the head shards; else as
  given (None stays None)."""
  if x is None or not split.heads or split.kv_heads_split:
    return x
  return lax.dynamic_slice_in_dim(x, _kv_head_index(split, axis_sizes, x.shape[axis]), 1, axis)


def _kv_head_index(split, axis_sizes, kv_heads):
  shards_per_kv_head = math.prod(axis_sizes[a] for a in split.heads) // kv_heads
  return lax.axis_index(split.heads) // shards_per_kv_head


def _ring(split, axis_sizes):
  return ring.Ring(
    axes=split.sequence,
    size=math.prod(axis_sizes[a] for a in split.sequence),
    striped=split.striped,
  )


def _gather(split, axis_sizes):
  return all_gather.Gather(
    axes=split.sequence,
    size=math.prod(axis_sizes[a] for a in split.sequence),
    zigzag=split.zigzag,
  )


def _axes_by_dimension(spec):
  """The mesh axes of each of the four dimensions of a (maybe shorter) PartitionSpec."""
  return [_axes(entry) for entry in spec] + [()] * (4 - len(spec))


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
  """A tuple of mesh axis names as a PartitionSpec entry."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


# --- The primitives attention.py binds --------------------------------------------


def attention_fwd(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  params: AttentionParams,
  return_max_logit: bool = False,
  descales=None,
  fp8: primitives.Fp8Params | None = None,
  context_parallel: str = "auto",
):
  """The forward on arrays sharded any way: returns (out, lse), and max_logit with
  `return_max_logit`. Absent seqused, rows and sinks are arrays of shape [0]; `descales`
  is None (absent) or (descale_q, descale_k, descale_v), each maybe of shape [0].
  `context_parallel` ("auto", "ring" or "all_gather") says how a split sequence runs
  (strategy.plan)."""
  descales = tuple(primitives.absent_if_none(x, jnp.float32) for x in (descales or (None,) * 3))
  if _in_shard_map():
    return tuple(
      primitives.attention_fwd(
        q,
        k,
        v,
        seqused_q,
        seqused_k,
        params,
        q_rows,
        kv_rows,
        sinks,
        return_max_logit,
        descales,
        fp8,
      )
    )
  mesh = _explicit_mesh(q, k, v)
  if mesh is None:
    return fwd_p.bind(
      q,
      k,
      v,
      seqused_q,
      seqused_k,
      q_rows,
      kv_rows,
      sinks,
      *descales,
      **dataclasses.asdict(params),
      return_max_logit=bool(return_max_logit),
      fp8=fp8,
      context_parallel=context_parallel,
    )
  split = _split_of(
    mesh, q, k, params, q_rows, fp8=fp8 is not None, context_parallel=context_parallel
  )
  q_spec = _spec(q)
  out_specs = (split.q_spec(), split.lse_spec())
  result_specs = (q_spec, PartitionSpec(q_spec[0], q_spec[2], q_spec[1]))
  if return_max_logit:
    out_specs += (split.per_head_spec(),)
    result_specs += (PartitionSpec(q_spec[0], q_spec[2]),)
  return _run_explicit(
    mesh,
    split,
    functools.partial(local_fwd, split, dict(mesh.shape), params, bool(return_max_logit), fp8),
    args=(q, k, v, seqused_q, seqused_k, q_rows, kv_rows, sinks, *descales),
    in_specs=(
      split.q_spec(),
      split.kv_spec(),
      split.kv_spec(),
      split.seqused_spec(seqused_q),
      split.seqused_spec(seqused_k),
      split.rows_spec(q_rows),
      split.rows_spec(kv_rows),
      split.per_head_spec(sinks),
      *split.descale_specs(*descales),
    ),
    out_specs=out_specs,
    result_specs=result_specs,
  )


def attention_bwd(
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  params: AttentionParams,
  deterministic: bool,
  context_parallel: str = "auto",
):
  """The backward on arrays sharded any way: returns (dq, dk, dv), and dsinks with sinks."""
  if _in_shard_map():
    return tuple(
      primitives.attention_bwd(
        dout, q, k, v, out, lse, seqused_q, seqused_k, params, deterministic, q_rows, kv_rows, sinks
      )
    )
  mesh = _explicit_mesh(q, k, v)
  if mesh is None:
    return bwd_p.bind(
      dout,
      q,
      k,
      v,
      out,
      lse,
      seqused_q,
      seqused_k,
      q_rows,
      kv_rows,
      sinks,
      **dataclasses.asdict(params),
      deterministic=deterministic,
      context_parallel=context_parallel,
    )
  split = _split_of(mesh, q, k, params, q_rows, context_parallel=context_parallel)
  q_spec, kv_spec = split.q_spec(), split.kv_spec()
  out_specs, result_specs = (q_spec, kv_spec, kv_spec), (_spec(q), _spec(k), _spec(v))
  if sinks.ndim == 2:
    out_specs += (split.per_head_spec(),)
    result_specs += (_spec(sinks),)
  return _run_explicit(
    mesh,
    split,
    functools.partial(local_bwd, split, dict(mesh.shape), params, deterministic),
    args=(dout, q, k, v, out, lse, seqused_q, seqused_k, q_rows, kv_rows, sinks),
    in_specs=(
      q_spec,
      q_spec,
      kv_spec,
      kv_spec,
      q_spec,
      split.lse_spec(),
      split.seqused_spec(seqused_q),
      split.seqused_spec(seqused_k),
      split.rows_spec(q_rows),
      split.rows_spec(kv_rows),
      split.per_head_spec(sinks),
    ),
    out_specs=out_specs,
    result_specs=result_specs,
  )


def _in_shard_map():
  """Whether this runs inside `jax.shard_map`, where the arrays are per-device shards along
  the manual axes. Any other axis is left to XLA, which gathers what the per-device call
  needs: XLA cannot apply custom_partitioning in a partly manual computation (it aborts)."""
  return AxisType.Manual in jax.sharding.get_abstract_mesh().axis_types


def _explicit_mesh(*arrays):
  """The mesh in the arrays' types if it has Explicit axes, else None. (Even for arrays
  it replicates: XLA then fails to compile custom_partitioning.)"""
  for x in arrays:
    mesh = jax.typeof(x).sharding.mesh
    if AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def _spec(x):
  return jax.typeof(x).sharding.spec


def _split_of(mesh, q, k, params, q_rows, fp8=False, context_parallel="auto"):
  return choose_split(
    dict(mesh.shape),
    _spec(q),
    _spec(k),
    q.shape,
    k.shape,
    params,
    packed=q_rows.ndim == 3,
    fp8=fp8,
    context_parallel=context_parallel,
  )


def _run_explicit(mesh, split, program, *, args, in_specs, out_specs, result_specs):
  """`program` under shard_map on the arguments resharded to `in_specs`; its results
  resharded to `result_specs`, the types the per-device primitives give (inputs' specs)."""
  args = [_reshard(x, mesh, spec) for x, spec in zip(args, in_specs)]
  if split.axes:
    # An absent seqused (empty) does not enter the manual computation: see
    # primitives.absent_if_none. The program gets None in its place.
    present = [x.size > 0 for x in args]

    def on_present(*operands, per_device=program):
      operands = iter(operands)
      return per_device(*(next(operands) if p else None for p in present))

    program = jax.shard_map(
      on_present,
      mesh=mesh,
      axis_names=split.axes,
      out_specs=out_specs,
      in_specs=tuple(s for s, p in zip(in_specs, present) if p),
    )
    args = [x for x, p in zip(args, present) if p]
  return tuple(_reshard(x, mesh, spec) for x, spec in zip(program(*args), result_specs))


def sharded_like(x, reference):
  """x with the sharding of `reference` where that is typed by Explicit mesh axes (a value
  computed from other arrays may have picked up their splits); else x as it is."""
  mesh = _explicit_mesh(reference)
  return x if mesh is None else _reshard(x, mesh, _spec(reference))


def _reshard(x, mesh, spec):
  return x if _spec(x) == spec else jax.sharding.reshard(x, NamedSharding(mesh, spec))


# --- Automatic partitioning: custom_partitioning with a Shardy rule -----------------


def _fwd_on_one_device(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  descale_q,
  descale_k,
  descale_v,
  params,
  return_max_logit,
  fp8,
  context_parallel,
):
  del context_parallel  # how a split sequence runs: nothing to do on one device
  return tuple(
    primitives.attention_fwd(
      q,
      k,
      v,
      seqused_q,
      seqused_k,
      params,
      q_rows,
      kv_rows,
      sinks,
      return_max_logit,
      (descale_q, descale_k, descale_v),
      fp8,
    )
  )


def _bwd_on_one_device(
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  params,
  deterministic,
  context_parallel,
):
  del context_parallel  # how a split sequence runs: nothing to do on one device
  return tuple(
    primitives.attention_bwd(
      dout, q, k, v, out, lse, seqused_q, seqused_k, params, deterministic, q_rows, kv_rows, sinks
    )
  )


def _partition_fwd(params, return_max_logit, fp8, context_parallel, mesh, arg_shapes, result_shape):
  del result_shape
  q, k, _, seqused_q, seqused_k, q_rows, kv_rows, sinks, *descales = arg_shapes
  split = choose_split(
    dict(mesh.shape),
    q.sharding.spec,
    k.sharding.spec,
    q.shape,
    k.shape,
    params,
    packed=len(q_rows.shape) == 3,
    fp8=fp8 is not None,
    context_parallel=context_parallel,
  )
  named = functools.partial(NamedSharding, mesh)
  arg_shardings = (
    named(split.q_spec()),
    named(split.kv_spec()),
    named(split.kv_spec()),
    named(split.seqused_spec(seqused_q)),
    named(split.seqused_spec(seqused_k)),
    named(split.rows_spec(q_rows)),
    named(split.rows_spec(kv_rows)),
    named(split.per_head_spec(sinks)),
    *map(named, split.descale_specs(*descales)),
  )
  result_shardings = (named(split.q_spec()), named(split.lse_spec()))
  if return_max_logit:
    result_shardings += (named(split.per_head_spec()),)
  program = functools.partial(local_fwd, split, dict(mesh.shape), params, return_max_logit, fp8)
  return mesh, program, result_shardings, arg_shardings


def _partition_bwd(params, deterministic, context_parallel, mesh, arg_shapes, result_shape):
  del result_shape
  _, q, k, _, _, _, seqused_q, seqused_k, q_rows, kv_rows, sinks = arg_shapes
  split = choose_split(
    dict(mesh.shape),
    q.sharding.spec,
    k.sharding.spec,
    q.shape,
    k.shape,
    params,
    packed=len(q_rows.shape) == 3,
    context_parallel=context_parallel,
  )
  named = functools.partial(NamedSharding, mesh)
  q_sharding, kv_sharding = named(split.q_spec()), named(split.kv_spec())
  arg_shardings = (
    q_sharding,
    q_sharding,
    kv_sharding,
    kv_sharding,
    q_sharding,
    named(split.lse_spec()),
    named(split.seqused_spec(seqused_q)),
    named(split.seqused_spec(seqused_k)),
    named(split.rows_spec(q_rows)),
    named(split.rows_spec(kv_rows)),
    named(split.per_head_spec(sinks)),
  )
  result_shardings = (q_sharding, kv_sharding, kv_sharding)
  if len(sinks.shape) == 2:
    result_shardings += (named(split.per_head_spec()),)
  program = functools.partial(local_bwd, split, dict(mesh.shape), params, deterministic)
  return mesh, program, result_shardings, arg_shardings


def _fwd_rule(params, return_max_logit, fp8, context_parallel, mesh, operand_types, result_types):
  del params, fp8, context_parallel, mesh, result_types
  (q, k, _, seqused_q, seqused_k, q_rows, kv_rows, sinks, descale_q, descale_k, descale_v) = (
    ir.RankedTensorType(t).shape for t in operand_types
  )
  heads, kv_heads = _head_factors(q[2], k[2])
  rule = (
    f"b t {heads} d, b s {kv_heads} d, b s {kv_heads} e, "
    f"{_seqused_factor(seqused_q, 'uq')}, {_seqused_factor(seqused_k, 'uk')}, "
    f"{_rows_factors(q_rows, 't', 'rq')}, {_rows_factors(kv_rows, 's', 'rk')}, "
    f"{_per_head_factors(sinks, heads, 'us')}, "
    f"{_descale_factors(descale_q, heads, 'qb', 'aq')}, "
    f"{_descale_factors(descale_k, kv_heads, 'kb', 'ak')}, "
    f"{_descale_factors(descale_v, kv_heads, None, 'av')} "
    f"-> b t {heads} e, b {heads} t" + (f", b {heads}" if return_max_logit else "")
  )
  # The head dims and the descales' blocks are never split; Shardy wants these in order of
  # first appearance.
  blocks = tuple(f for f, x in (("qb", descale_q), ("kb", descale_k)) if len(x) == 3)
  return rule, dict(need_replication_factors=("d", "e", *blocks))


def _bwd_rule(params, deterministic, context_parallel, mesh, operand_types, result_types):
  del params, deterministic, context_parallel, mesh, result_types
  _, q, k, _, _, _, seqused_q, seqused_k, q_rows, kv_rows, sinks = (
    ir.RankedTensorType(t).shape for t in operand_types
  )
  heads, kv_heads = _head_factors(q[2], k[2])
  rule = (
    f"b t {heads} e, b t {heads} d, b s {kv_heads} d, b s {kv_heads} e, "
    f"b t {heads} e, b {heads} t, "
    f"{_seqused_factor(seqused_q, 'uq')}, {_seqused_factor(seqused_k, 'uk')}, "
    f"{_rows_factors(q_rows, 't', 'rq')}, {_rows_factors(kv_rows, 's', 'rk')}, "
    f"{_per_head_factors(sinks, heads, 'us')} "
    f"-> b t {heads} d, b s {kv_heads} d, b s {kv_heads} e"
    + (f", b {heads}" if len(sinks) == 2 else "")
  )
  return rule, dict(need_replication_factors=("e", "d"))


def _head_factors(heads, kv_heads):
  """The factors of q's and of k's heads.

  MHA shares one factor. Grouped heads get two: `partition` keeps them consistent
  (`choose_split`). The compound factor (kv head, group) would let Shardy carry a head
  split from q to k, but with more head shards than k/v heads it splits a mesh axis into
  sub-axes, which custom_partitioning cannot turn into the NamedShardings `partition` takes.
  """
  if heads == kv_heads:
    return "n", "n"
  return "h", "n"


def _seqused_factor(shape, absent_factor):
  return "b" if shape[0] else absent_factor


def _per_head_factors(shape, heads, absent_factor):
  """[batch, heads] arrays (sinks) share q's batch and heads."""
  return f"b {heads}" if len(shape) == 2 else absent_factor


def _descale_factors(shape, heads, blocks, absent_factor):
  """FP8 descales share the batch and q's (descale_q) or k's heads; their blocks are a
  factor of their own."""
  if len(shape) == 1:
    return absent_factor
  return f"b {heads} {blocks}" if blocks else f"b {heads}"


def _rows_factors(shape, sequence, absent_factor):
  """Rows share the batch and the sequence of their side; their last axis is a field."""
  return f"b {sequence} {absent_factor}" if len(shape) == 3 else absent_factor


_fwd_partitioned = custom_partitioning(_fwd_on_one_device, static_argnums=(11, 12, 13, 14))
_fwd_partitioned.def_partition(_partition_fwd, sharding_rule=_fwd_rule)
_bwd_partitioned = custom_partitioning(_bwd_on_one_device, static_argnums=(11, 12, 13))
_bwd_partitioned.def_partition(_partition_bwd, sharding_rule=_bwd_rule)


def _lower_fwd(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  descale_q,
  descale_k,
  descale_v,
  *,
  return_max_logit,
  fp8,
  context_parallel,
  **params,
):
  return _fwd_partitioned(
    q,
    k,
    v,
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    sinks,
    descale_q,
    descale_k,
    descale_v,
    AttentionParams(**params),
    return_max_logit,
    fp8,
    context_parallel,
  )


def _lower_bwd(
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  *,
  deterministic,
  context_parallel,
  **params,
):
  return _bwd_partitioned(
    dout,
    q,
    k,
    v,
    out,
    lse,
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    sinks,
    AttentionParams(**params),
    deterministic,
    context_parallel,
  )


def _define(name, local_primitive, lowering):
  primitive = Primitive(name)
  primitive.multiple_results = True
  primitive.def_impl(functools.partial(xla.apply_primitive, primitive))
  # The per-device primitive's abstract eval (with its effects): same shapes, dtypes, shardings.
  primitive.def_effectful_abstract_eval(local_primitive.abstract_eval)
  mlir.register_lowering(primitive, mlir.lower_fun(lowering, multiple_results=True))
  # custom_partitioning needs the devices when it lowers; jit provides them only to
  # jaxprs holding a primitive from this (private) registry, as jax's cuDNN attention does.
  dispatch.prim_requires_devices_during_lowering.add(primitive)
  batching.primitive_batchers[primitive] = functools.partial(
    _primitive_rules.fold_vmap_axis_into_batch, primitive
  )
  return primitive


fwd_p = _define("fa3_fwd", primitives.fwd_p, _lower_fwd)
bwd_p = _define("fa3_bwd", primitives.bwd_p, _lower_bwd)


# --- Decode (flash_attention_with_kvcache) on a mesh ----------------------------------
# What stays split, with no communication:
# - contiguous caches [batch, max_seqlen, kv_heads, d]: the batch and the heads (the k/v
#   heads split like q's, so their count must be a multiple of the head shards);
# - paged caches [num_pages, page_size, kv_heads, d]: the heads only. The page pool is not
#   split by sequence (any sequence may own any page), so a batch split is gathered first
#   and the pool is replicated over the batch axes (each device then writes every sequence's
#   new rows into its copy, and the copies stay equal).
# Anything else (a split sequence or head dim, head counts the shards do not divide) is
# gathered before the call.


@dataclasses.dataclass(frozen=True)
class DecodeSplit:
  """The mesh axes that split one decode call's batch and heads."""

  batch: tuple[str, ...] = ()
  heads: tuple[str, ...] = ()
  paged: bool = False

  @property
  def axes(self) -> frozenset[str]:
    return frozenset(self.batch + self.heads)

  def q_spec(self):  # q, out, k_new, v_new
    return PartitionSpec(_entry(self.batch), None, _entry(self.heads), None)

  def lse_spec(self):
    return PartitionSpec(_entry(self.batch), _entry(self.heads), None)

  def cache_spec(self):
    return PartitionSpec(None if self.paged else _entry(self.batch), None, _entry(self.heads), None)

  def operand_specs(self, k_new, page_table):
    """q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table; absent ones replicated."""
    new = self.q_spec() if k_new.ndim == 4 else PartitionSpec(None)
    table = PartitionSpec(_entry(self.batch), None) if page_table.ndim == 2 else PartitionSpec(None)
    return (
      self.q_spec(),
      self.cache_spec(),
      self.cache_spec(),
      PartitionSpec(_entry(self.batch)),
      new,
      new,
      table,
    )

  def result_specs(self):
    return (self.q_spec(), self.lse_spec(), self.cache_spec(), self.cache_spec())


def choose_decode_split(axis_sizes, q_spec, cache_spec, q_shape, cache_shape, paged) -> DecodeSplit:
  """How to run decode on q and the cache sharded as `q_spec` and `cache_spec`: the batch
  keeps the axes q (or else a contiguous cache) splits it over, if they divide it, and never
  for a paged cache; the heads keep q's (or else the cache's) axes if they divide both the
  query heads and the k/v heads."""
  taken = set()
  pick = functools.partial(_pick, axis_sizes, taken)

  q_axes, cache_axes = _axes_by_dimension(q_spec), _axes_by_dimension(cache_spec)
  batch = () if paged else pick([q_axes[0], cache_axes[0]], q_shape[0])
  heads = pick([q_axes[2], cache_axes[2]], q_shape[2], cache_shape[2])
  return DecodeSplit(batch=batch, heads=heads, paged=paged)


def _local_decode(params, q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table):
  """Decode on one device's shards (absent operands None or shape [0])."""
  absent = lambda x: primitives.absent_if_none(primitives.none_if_absent(x))
  return tuple(
    primitives.decode_p.bind(
      q, k_cache, v_cache, cache_seqlens, *map(absent, (k_new, v_new, page_table)), **dict(params)
    )
  )


def decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, **params):
  """The decode primitive on arrays sharded any way (absent operands shape [0]):
  (out, lse, k_cache, v_cache)."""
  operands = (q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table)
  if _in_shard_map():
    return tuple(primitives.decode_p.bind(*operands, **params))
  mesh = _explicit_mesh(q, k_cache, v_cache)
  if mesh is None:
    return tuple(decode_p.bind(*operands, **params))
  split = choose_decode_split(
    dict(mesh.shape), _spec(q), _spec(k_cache), q.shape, k_cache.shape, paged=page_table.ndim == 2
  )
  q_spec = _spec(q)
  return _run_explicit(
    mesh,
    split,
    functools.partial(_local_decode, tuple(sorted(params.items()))),
    args=operands,
    in_specs=split.operand_specs(k_new, page_table),
    out_specs=split.result_specs(),
    result_specs=(
      q_spec,
      PartitionSpec(q_spec[0], q_spec[2], q_spec[1]),
      _spec(k_cache),
      _spec(v_cache),
    ),
  )


def _decode_on_one_device(q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, params):
  return _local_decode(params, q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table)


def _partition_decode(params, mesh, arg_shapes, result_shape):
  del result_shape
  q, k_cache, _, _, k_new, _, page_table = arg_shapes
  split = choose_decode_split(
    dict(mesh.shape),
    q.sharding.spec,
    k_cache.sharding.spec,
    q.shape,
    k_cache.shape,
    paged=len(page_table.shape) == 2,
  )
  named = functools.partial(NamedSharding, mesh)
  k_new, page_table = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_new, page_table))
  arg_shardings = tuple(map(named, split.operand_specs(k_new, page_table)))
  result_shardings = tuple(map(named, split.result_specs()))
  return mesh, functools.partial(_local_decode, params), result_shardings, arg_shardings


def _decode_rule(params, mesh, operand_types, result_types):
  del params, mesh, result_types
  q, k_cache, _, _, k_new, _, page_table = (ir.RankedTensorType(t).shape for t in operand_types)
  heads, kv_heads = _head_factors(q[2], k_cache[2])
  paged = len(page_table) == 2
  cache = f"p r {kv_heads} d" if paged else f"b s {kv_heads} d"
  new = f"b u {kv_heads} d" if len(k_new) == 4 else None
  rule = (
    f"b t {heads} d, {cache}, {cache}, b, {new or 'ak'}, {new or 'av'}, "
    f"{'b m' if paged else 'ap'} -> b t {heads} d, b {heads} t, {cache}, {cache}"
  )
  # Only the batch (contiguous) and the heads may stay split; `partition` decides which.
  fixed = ("t", "d", "p", "r", "u", "m") if paged else ("t", "d", "s", "u")
  fixed = tuple(f for f in fixed if f != "u" or new)
  return rule, dict(need_replication_factors=fixed)


_decode_partitioned = custom_partitioning(_decode_on_one_device, static_argnums=(7,))
_decode_partitioned.def_partition(_partition_decode, sharding_rule=_decode_rule)


def _lower_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, **params):
  return _decode_partitioned(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, tuple(sorted(params.items()))
  )


decode_p = Primitive("fa3_decode")
decode_p.multiple_results = True
decode_p.def_impl(functools.partial(xla.apply_primitive, decode_p))
decode_p.def_effectful_abstract_eval(primitives.decode_p.abstract_eval)
mlir.register_lowering(decode_p, mlir.lower_fun(_lower_decode, multiple_results=True))
dispatch.prim_requires_devices_during_lowering.add(decode_p)
batching.primitive_batchers[decode_p] = functools.partial(primitives.decode_batch, decode_p)
ad.primitive_jvps[decode_p] = ad.primitive_jvps[primitives.decode_p]
