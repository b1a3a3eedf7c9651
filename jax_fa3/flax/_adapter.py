"""What the linen and nnx adapters share: a Flax attention call on jax_fa3's kernels.

`attention` computes what Flax's own `dot_product_attention` would, on the kernels, or
raises a TypeError/ValueError that names the argument they can't serve. `fall_back`
turns that error into a one-time warning (or re-raises it in strict mode), after which
the caller runs Flax's own computation. `check_shapes` comes first and raises for shapes
that neither can take.
"""

import functools
import warnings

import jax.numpy as jnp

import jax_fa3
from jax_fa3.attention import DTYPES

MASK_STRUCTURES = (None, "padding")


def check_mask_structure(mask_structure):
  if mask_structure not in MASK_STRUCTURES:
    raise ValueError(f"mask_structure must be one of {MASK_STRUCTURES}, got {mask_structure!r}")


def check_shapes(query, key, value, mask):
  """Flax's shape rules, which neither the kernels nor Flax's own attention can do without:
  a ValueError naming the rule, raised before either runs (never a fall-back)."""
  shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
  if not 3 <= query.ndim == key.ndim == value.ndim:
    raise ValueError(f"jax_fa3.flax: query, key and value must be [batch..., length, heads, "
                     f"head_dim], of one rank of at least 3, got {shapes}")
  batch_dims = query.shape[:-3]
  if key.shape[:-3] != batch_dims or value.shape[:-3] != batch_dims:
    raise ValueError(f"jax_fa3.flax: query, key and value must have the same batch dims, "
                     f"got {shapes}")
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f"jax_fa3.flax: key and value must have the same length, got {shapes}")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"jax_fa3.flax: query and key must have the same head_dim, got {shapes}")
  heads = query.shape[-2]
  if any(x.shape[-2] == 0 or heads % x.shape[-2] for x in (key, value)):
    raise ValueError(f"jax_fa3.flax: query heads must be a multiple of key and value "
                     f"heads, got {shapes}")
  if mask is not None:
    target = (*batch_dims, heads, query.shape[-3], key.shape[-3])
    mask_shape = jnp.shape(mask)
    padded = (1,) * (len(target) - len(mask_shape)) + mask_shape
    if len(mask_shape) > len(target) or any(m not in (1, t) for m, t in zip(padded, target)):
      raise ValueError(f"jax_fa3.flax: `mask` must broadcast to [batch..., heads, q_length, "
                       f"kv_length] = {list(target)}, got shape {mask_shape}")


def attention(query, key, value, *, bias, mask, is_causal, mask_structure, dropout_rate,
              deterministic, module):
  """Flax's dot-product attention on the kernels: the same result, up to rounding.

  Shapes as in Flax: `query [batch..., T, N, H]`, `key` and `value [batch..., S, K, H]`
  with `N % K == 0`. `is_causal` is Flax's (and jax.nn's) top-left aligned causal mask,
  combined with `mask` by logical and. A query row that sees no key gets the mean of
  all values, as in Flax.

  With mask_structure="padding", `mask` must keep a prefix of the queries and a prefix
  of the keys of each sequence (within the causal triangle when `is_causal`). That is
  checked on the device: a mask of any other shape turns the whole output into NaN.
  """
  if bias is not None:
    raise ValueError("jax_fa3.flax: `bias` must be None on the kernels, which add no bias "
                     "to the scores")
  if module is not None:
    raise ValueError("jax_fa3.flax: `module` must be None on the kernels: it asks for the "
                     "attention weights to be sown (sow_weights=True), and they never form them")
  if dropout_rate > 0 and not deterministic:
    raise ValueError(f"jax_fa3.flax: `dropout_rate` must be 0 (or `deterministic` True) on the "
                     f"kernels, which have no attention dropout; got dropout_rate={dropout_rate}")
  if query.dtype not in DTYPES:
    raise TypeError(f"jax_fa3.flax: query, key and value must be bfloat16 or float16 on the "
                    f"kernels, got {query.dtype}; set the module's dtype=jnp.bfloat16")
  if mask is not None and mask_structure != "padding":
    raise ValueError("jax_fa3.flax: a `mask` needs mask_structure='padding' on the kernels, "
                     "which then check that it only marks right padding (valid tokens first); "
                     "express causality with is_causal=True")
  batch_dims = query.shape[:-3]  # shapes checked by check_shapes
  q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
  if mask is None:
    out = jax_fa3.dot_product_attention(q, k, v, is_causal=is_causal, implementation="fa3")
  else:
    query_lengths, key_lengths, matches = _padding_lengths(
        mask, batch_dims, q.shape[1], k.shape[1], is_causal)
    out = jax_fa3.dot_product_attention(
        q, k, v, is_causal=is_causal, query_seq_lengths=query_lengths,
        key_value_seq_lengths=key_lengths, implementation="fa3")
    out = _mean_value_in_padded_rows(out, v, query_lengths)
    out = jnp.where(matches, out, jnp.nan)
  return out.reshape(*batch_dims, *out.shape[1:])


def _padding_lengths(mask, batch_dims, seqlen_q, seqlen_k, is_causal):
  """A right-padding mask as per-sequence lengths, and whether it is exactly that.

  The lengths count the queries that see some key and the keys that some query sees.
  `matches` is a traced bool: true iff the mask (and the causal triangle) keeps precisely
  the queries below the query length and the keys below the key length, in every head,
  which is when attention with these lengths equals attention with the mask.
  """
  mask = jnp.asarray(mask)  # its shape checked by check_shapes
  rank = len(batch_dims) + 3
  mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
  keep = jnp.broadcast_to(mask != 0, (*batch_dims, mask.shape[-3], seqlen_q, seqlen_k))
  keep = keep.reshape(-1, *keep.shape[-3:])  # [batch, heads or 1, T, S]
  causal = jnp.tril(jnp.ones((seqlen_q, seqlen_k), bool))
  if is_causal:
    keep &= causal
  query_lengths = jnp.sum(jnp.any(keep, axis=(1, 3)), axis=-1, dtype=jnp.int32)
  key_lengths = jnp.sum(jnp.any(keep, axis=(1, 2)), axis=-1, dtype=jnp.int32)
  rebuilt = ((jnp.arange(seqlen_q)[:, None] < query_lengths[:, None, None])
             & (jnp.arange(seqlen_k) < key_lengths[:, None, None]))
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
