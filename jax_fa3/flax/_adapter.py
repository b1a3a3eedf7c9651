"""What the linen and nnx adapters share: a Flax attention call on jax_fa3's kernels.

`attention` computes what Flax's own `dot_product_attention` would, on the kernels, or
raises a TypeError/ValueError that names the argument they can't serve. `fall_back`
turns that error into a one-time warning (or re-raises it in strict mode), after which
the caller runs Flax's own computation. `check_shapes` comes first and raises for shapes
that neither can take.
"""

import contextlib
import contextvars
import functools
import warnings

import jax.numpy as jnp

import jax_fa3
from jax_fa3 import strategy
from jax_fa3.attention import DTYPES

MASK_STRUCTURES = (None, "padding", "segments")
# What a module's __call__ passes to the attention_fn it calls beyond Flax's fixed set of
# arguments: the segment ids it received, and its sinks parameter.
_call_segment_ids = contextvars.ContextVar("jax_fa3_segment_ids", default=None)
_call_sinks = contextvars.ContextVar("jax_fa3_sinks", default=None)


@contextlib.contextmanager
def module_call(segment_ids=None, sinks=None):
  """Makes `segment_ids` (packed documents) and `sinks` those of the attention calls made
  inside."""
  tokens = _call_segment_ids.set(segment_ids), _call_sinks.set(sinks)
  try:
    yield
  finally:
    _call_segment_ids.reset(tokens[0])
    _call_sinks.reset(tokens[1])


def segment_ids_or_call(segment_ids):
  """The explicit ids, else those of the module call in progress (or None)."""
  return _call_segment_ids.get() if segment_ids is None else segment_ids


def sinks_or_call(sinks):
  """The explicit sinks, else those of the module call in progress (or None)."""
  return _call_sinks.get() if sinks is None else sinks


def no_fall_back_with_sinks(unsupported, sinks):
  """Flax's own attention has no sinks: with them, a call the kernels can't serve is an error."""
  if sinks is not None:
    raise ValueError(
      f"{unsupported}; with `sinks` there is no fall-back (Flax's attention has no sinks)"
    ) from unsupported


def segment_mask(segment_ids):
  """Flax's dense mask [batch..., 1, T, T] for packed documents: same id, id >= 0."""
  ids = jnp.asarray(segment_ids)
  same = ids[..., :, None] == ids[..., None, :]
  return (same & (ids >= 0)[..., :, None])[..., None, :, :]


def check_context_parallel(context_parallel):
  return strategy.check("jax_fa3.flax", context_parallel)


def check_mask_structure(mask_structure):
  if mask_structure not in MASK_STRUCTURES:
    raise ValueError(f"mask_structure must be one of {MASK_STRUCTURES}, got {mask_structure!r}")


def check_shapes(query, key, value, mask):
  """Flax's shape rules, which neither the kernels nor Flax's own attention can do without:
  a ValueError naming the rule, raised before either runs (never a fall-back)."""
  shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
  if not 3 <= query.ndim == key.ndim == value.ndim:
    raise ValueError(
      f"jax_fa3.flax: query, key and value must be [batch..., length, heads, "
      f"head_dim], of one rank of at least 3, got {shapes}"
    )
  batch_dims = query.shape[:-3]
  if key.shape[:-3] != batch_dims or value.shape[:-3] != batch_dims:
    raise ValueError(
      f"jax_fa3.flax: query, key and value must have the same batch dims, got {shapes}"
    )
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f"jax_fa3.flax: key and value must have the same length, got {shapes}")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"jax_fa3.flax: query and key must have the same head_dim, got {shapes}")
  heads = query.shape[-2]
  if any(x.shape[-2] == 0 or heads % x.shape[-2] for x in (key, value)):
    raise ValueError(
      f"jax_fa3.flax: query heads must be a multiple of key and value heads, got {shapes}"
    )
  if mask is not None:
    target = (*batch_dims, heads, query.shape[-3], key.shape[-3])
    mask_shape = jnp.shape(mask)
    padded = (1,) * (len(target) - len(mask_shape)) + mask_shape
    if len(mask_shape) > len(target) or any(m not in (1, t) for m, t in zip(padded, target)):
      raise ValueError(
        f"jax_fa3.flax: `mask` must broadcast to [batch..., heads, q_length, "
        f"kv_length] = {list(target)}, got shape {mask_shape}"
      )


def attention(
  query,
  key,
  value,
  *,
  bias,
  mask,
  is_causal,
  mask_structure,
  dropout_rate,
  deterministic,
  module,
  segment_ids=None,
  sinks=None,
  context_parallel="auto",
):
  """Flax's dot-product attention on the kernels: the same result, up to rounding.

  Shapes as in Flax: `query [batch..., T, N, H]`, `key` and `value [batch..., S, K, H]`
  with `N % K == 0`. `is_causal` is Flax's (and jax.nn's) top-left aligned causal mask,
  combined with `mask` by logical and. A query row that sees no key gets the mean of
  all values, as in Flax.

  With mask_structure="padding", `mask` must keep a prefix of the queries and a prefix
  of the keys of each sequence (within the causal triangle when `is_causal`). That is
  checked on the device: a mask of any other shape turns the whole output into NaN.

  `segment_ids [batch..., T]` (self-attention, T == S): packed documents, a query sees
  the keys of its own document (negative ids: padding). With mask_structure="segments",
  `mask` is such a document mask (`make_attention_mask(ids, ids, jnp.equal)`, maybe
  combined with padding and `make_causal_mask`); the documents are read from it and the
  mask checked on the device, all NaN if it is not one.

  `sinks [heads]`: attention sinks (jax_fa3.flash_attention's), served without a mask, with
  `segment_ids` or a "segments" mask. A row that sees no key then has output 0 (all its
  weight is on the sink) rather than Flax's mean of the values.

  `context_parallel`: how the kernels run a sequence split over devices (checked first by
  `check_context_parallel`, so that a bad value is an error, not a fall-back).
  """
  if bias is not None:
    raise ValueError(
      "jax_fa3.flax: `bias` must be None on the kernels, which add no bias to the scores"
    )
  if module is not None:
    raise ValueError(
      "jax_fa3.flax: `module` must be None on the kernels: it asks for the "
      "attention weights to be sown (sow_weights=True), and they never form them"
    )
  if dropout_rate > 0 and not deterministic:
    raise ValueError(
      f"jax_fa3.flax: `dropout_rate` must be 0 (or `deterministic` True) on the "
      f"kernels, which have no attention dropout; got dropout_rate={dropout_rate}"
    )
  if query.dtype not in DTYPES:
    raise TypeError(
      f"jax_fa3.flax: query, key and value must be bfloat16 or float16 on the "
      f"kernels, got {query.dtype}; set the module's dtype=jnp.bfloat16"
    )
  if segment_ids is not None and mask is not None:
    raise ValueError(
      "jax_fa3.flax: `segment_ids` and a `mask` together are not served by the "
      "kernels; pass the documents as one or the other"
    )
  if mask is not None and mask_structure not in ("padding", "segments"):
    raise ValueError(
      "jax_fa3.flax: a `mask` needs mask_structure='padding' or 'segments' on "
      "the kernels, which then check that it only marks right padding (valid "
      "tokens first) or documents; express causality with is_causal=True"
    )
  if sinks is not None and mask is not None and mask_structure != "segments":
    raise ValueError(
      "jax_fa3.flax: `sinks` with a padding mask are not served; mark padding "
      "with negative `segment_ids` instead"
    )
  if sinks is not None and is_causal and query.shape[-3] != key.shape[-3]:
    raise ValueError(
      f"jax_fa3.flax: `sinks` with is_causal need equal query and key lengths "
      f"(Flax's causal mask is top-left aligned), got {query.shape[-3]} and "
      f"{key.shape[-3]}"
    )
  batch_dims = query.shape[:-3]  # shapes checked by check_shapes
  q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
  how = dict(context_parallel=context_parallel)
  if segment_ids is not None or (mask_structure == "segments" and mask is not None):
    out = _segment_attention(q, k, v, segment_ids, mask, batch_dims, is_causal, sinks, how)
  elif sinks is not None:
    out = jax_fa3.flash_attention(q, k, v, causal=is_causal, sinks=sinks, **how)
  elif mask is None:
    out = jax_fa3.dot_product_attention(q, k, v, is_causal=is_causal, implementation="fa3", **how)
  else:
    query_lengths, key_lengths, matches = _padding_lengths(
      mask, batch_dims, q.shape[1], k.shape[1], is_causal
    )
    out = jax_fa3.dot_product_attention(
      q,
      k,
      v,
      is_causal=is_causal,
      query_seq_lengths=query_lengths,
      key_value_seq_lengths=key_lengths,
      implementation="fa3",
      **how,
    )
    out = _mean_value_in_padded_rows(out, v, query_lengths)
    out = jnp.where(matches, out, jnp.nan)
  return out.reshape(*batch_dims, *out.shape[1:])


def _segment_attention(q, k, v, segment_ids, mask, batch_dims, is_causal, sinks, how):
  """Packed documents on the kernels, with Flax's mean of values in rows that see no key
  (without sinks: with them such rows have lse = the sink, and output 0). Given a mask
  instead of ids, the ids are read from it and the mask checked."""
  seqlen = q.shape[1]
  if k.shape[1] != seqlen:
    raise ValueError(
      f"jax_fa3.flax: packed documents need self-attention (equal query and "
      f"key lengths), got {seqlen} and {k.shape[1]}"
    )
  matches = True
  if segment_ids is None:
    segment_ids, matches = _documents_of_mask(mask, batch_dims, seqlen, is_causal)
  else:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (*batch_dims, seqlen):
      raise ValueError(
        f"jax_fa3.flax: segment_ids must have shape [batch..., length] = "
        f"{[*batch_dims, seqlen]}, got {list(segment_ids.shape)}"
      )
    segment_ids = segment_ids.reshape(-1, seqlen)
  out, lse = jax_fa3.flash_attention(
    q, k, v, segment_ids=segment_ids, causal=is_causal, sinks=sinks, return_lse=True, **how
  )
  keyless = jnp.swapaxes(lse, 1, 2)[..., None] == -jnp.inf
  mean_value = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True)
  mean_value = jnp.repeat(mean_value, q.shape[2] // v.shape[2], axis=2)
  out = jnp.where(keyless, mean_value.astype(out.dtype), out)
  return jnp.where(matches, out, jnp.nan)


def _documents_of_mask(mask, batch_dims, seqlen, is_causal):
  """A document mask as ids, and whether it is exactly one (a traced bool).

  A query's id is the first key it sees (-1 if none); in self-attention a key shares its
  own query's id. The mask is a document mask iff rebuilding it from these ids gives it
  back, in every head.
  """
  keep, causal = _kept_pairs(mask, batch_dims, seqlen, seqlen, is_causal)
  sees = jnp.any(keep[:, 0], axis=-1)
  ids = jnp.where(sees, jnp.argmax(keep[:, 0], axis=-1), -1).astype(jnp.int32)
  rebuilt = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
  if is_causal:
    rebuilt &= causal
  return ids, jnp.all(keep == rebuilt[:, None])


def _kept_pairs(mask, batch_dims, seqlen_q, seqlen_k, is_causal):
  """The (query, key) pairs a Flax mask keeps, [batch, heads or 1, T, S] bool, within the
  causal triangle with `is_causal`; and that triangle."""
  mask = jnp.asarray(mask)  # its shape checked by check_shapes
  rank = len(batch_dims) + 3
  mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
  keep = jnp.broadcast_to(mask != 0, (*batch_dims, mask.shape[-3], seqlen_q, seqlen_k))
  keep = keep.reshape(-1, *keep.shape[-3:])
  causal = jnp.tril(jnp.ones((seqlen_q, seqlen_k), bool))
  if is_causal:
    keep &= causal
  return keep, causal


def _padding_lengths(mask, batch_dims, seqlen_q, seqlen_k, is_causal):
  """A right-padding mask as per-sequence lengths, and whether it is exactly that.

  The lengths count the queries that see some key and the keys that some query sees.
  `matches` is a traced bool: true iff the mask (and the causal triangle) keeps precisely
  the queries below the query length and the keys below the key length, in every head,
  which is when attention with these lengths equals attention with the mask.
  """
  keep, causal = _kept_pairs(mask, batch_dims, seqlen_q, seqlen_k, is_causal)
  query_lengths = jnp.sum(jnp.any(keep, axis=(1, 3)), axis=-1, dtype=jnp.int32)
  key_lengths = jnp.sum(jnp.any(keep, axis=(1, 2)), axis=-1, dtype=jnp.int32)
  rebuilt = (jnp.arange(seqlen_q)[:, None] < query_lengths[:, None, None]) & (
    jnp.arange(seqlen_k) < key_lengths[:, None, None]
  )
  if is_causal:
    rebuilt &= causal
  return query_lengths, key_lengths, jnp.all(keep == rebuilt[:, None])


def _mean_value_in_padded_rows(out, value, query_lengths):
  """Flax gives a query row that sees no key the mean of all values; jax.nn's semantics,
  which jax_fa3 follows, zero the rows past `query_seq_lengths` instead."""
  _, seqlen_q, heads, _ = out.shape
  padded = jnp.arange(seqlen_q)[:, None, None] >= query_lengths[:, None, None, None]
  mean_value = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True)
  mean_value = jnp.repeat(mean_value, heads // value.shape[2], axis=2)
  return jnp.where(padded, mean_value.astype(out.dtype), out)


def fall_back(unsupported, strict):
  """Re-raises `unsupported` in strict mode; otherwise warns, once per reason, that Flax's
  own attention runs instead."""
  if strict:
    raise unsupported
  _warn_once(f"{unsupported}. Running Flax's attention instead (strict=True makes this an error).")


@functools.cache
def _warn_once(message):
  warnings.warn(message, stacklevel=4)
