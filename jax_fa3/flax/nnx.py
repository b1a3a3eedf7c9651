"""jax_fa3 for flax.nnx: an `attention_fn` for `MultiHeadAttention`, and that module with
it as the default.

    layer = nnx.MultiHeadAttention(num_heads=8, in_features=512, dtype=jnp.bfloat16,
                                   decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=jax_fa3.flax.nnx.dot_product_attention)
    y = layer(x, is_causal=True)
"""

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from jax_fa3.flax import _adapter


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout=True,
  dropout_rng=None,
  dropout_rate=0.0,
  deterministic=False,
  dtype=None,
  precision=None,
  module=None,
  promote_dtype=dtypes.promote_dtype,
  is_causal=False,
  *,
  segment_ids=None,
  sinks=None,
  mask_structure=None,
  strict=False,
  context_parallel="auto",
):
  """`flax.nnx.dot_product_attention` on jax_fa3's kernels, where they can serve the call.

  Takes the arguments of `flax.nnx.dot_product_attention`. The kernels serve a call with
  bfloat16 or float16 inputs (after `promote_dtype` to `dtype`), no `bias`, no dropout
  while training, no `module` (sow_weights=False), and a `mask` only if
  `mask_structure="padding"`. `is_causal` is their causal flag; GQA (`num_kv_heads`) is
  served too. `precision` needs nothing from them: they compute in float32.

  Any other call runs `flax.nnx.dot_product_attention` instead, after a warning that
  names the argument (once per reason); with `strict=True` it raises that error instead.
  Shapes Flax's attention can't take either (ranks below 3 or unequal, unequal batch dims,
  a `mask` that does not broadcast to [batch..., heads, q_length, kv_length]) raise a
  ValueError, with or without `strict`.

  Keyword-only arguments, set them with `functools.partial`:
    mask_structure: None: `mask` may be any mask, and Flax's attention runs whenever one
      is given. "padding": `mask` only marks right padding: for each sequence it keeps
      the first q_len queries and the first kv_len keys (and is combined with
      `is_causal`), as `make_attention_mask(tokens != pad, tokens != pad)` and the decode
      cache's mask do. The kernels then take those lengths, and check on the device that
      the mask is exactly that: if it is not, the output is all NaN, never a wrong number.
      "segments": `mask` is a packed-document mask, as `make_attention_mask(ids, ids,
      jnp.equal)` (maybe combined with padding and causal masks): the kernels read the
      documents from it and check on the device that it is exactly that (else all NaN).
    segment_ids: `[batch..., length]` packed documents (self-attention): a query sees the
      keys of its own document; negative ids are padding. The module's `__call__` takes
      it too (`MultiHeadAttention(...)(x, segment_ids=ids)`) and passes it here.
    sinks: `[heads]` attention sinks (`jax_fa3.flash_attention`'s); the module's `sinks=True`
      makes them a learnable parameter and passes them here. Served without a mask, with
      segment ids or a "segments" mask; Flax's attention has none, so a call the kernels
      can't serve is an error, not a fall-back.
    strict: raise instead of falling back to Flax's attention.
    context_parallel: how the kernels run a sequence split over devices ("auto", "ring",
      "all_gather"), as in `jax_fa3.flash_attention`; any other value is an error.
  """
  _adapter.check_mask_structure(mask_structure)
  _adapter.check_context_parallel(context_parallel)
  segment_ids = _adapter.segment_ids_or_call(segment_ids)
  sinks = _adapter.sinks_or_call(sinks)
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  _adapter.check_shapes(query, key, value, mask)
  try:
    return _adapter.attention(
      query,
      key,
      value,
      bias=bias,
      mask=mask,
      is_causal=is_causal,
      mask_structure=mask_structure,
      dropout_rate=dropout_rate,
      deterministic=deterministic,
      module=module,
      segment_ids=segment_ids,
      sinks=sinks,
      context_parallel=context_parallel,
    )
  except (TypeError, ValueError) as unsupported:
    _adapter.no_fall_back_with_sinks(unsupported, sinks)
    _adapter.fall_back(unsupported, strict)
  if segment_ids is not None:
    documents = _adapter.segment_mask(segment_ids)
    mask = documents if mask is None else jnp.logical_and(mask, documents)
  return nnx.dot_product_attention(
    query,
    key,
    value,
    bias,
    mask,
    broadcast_dropout,
    dropout_rng,
    dropout_rate,
    deterministic,
    dtype,
    precision,
    module,
    promote_dtype,
    is_causal,
  )


class MultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` with jax_fa3's `dot_product_attention` as its default
  `attention_fn`; it takes the same arguments, and its call also takes `segment_ids`
  (packed documents, `[batch..., length]`), which it passes to the attention function.

  `sinks=True` adds attention sinks (as in gpt-oss): a learnable float32 `[num_heads]`
  parameter `self.sinks`, initialised to zeros, passed to the attention function.
  """

  def __init__(self, *args, attention_fn=dot_product_attention, sinks=False, **kwargs):
    super().__init__(*args, attention_fn=attention_fn, **kwargs)
    self.sinks = nnx.Param(jnp.zeros((self.num_heads,), jnp.float32)) if sinks else None

  def __call__(self, *args, segment_ids=None, **kwargs):
    sinks = None if self.sinks is None else self.sinks[...]
    with _adapter.module_call(segment_ids, sinks):
      return super().__call__(*args, **kwargs)
