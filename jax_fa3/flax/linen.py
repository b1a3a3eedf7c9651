"""jax_fa3 for flax.linen: an `attention_fn` for `MultiHeadDotProductAttention`, and that
module with it as the default.

    layer = nn.MultiHeadDotProductAttention(
        num_heads=8, dtype=jnp.bfloat16,
        attention_fn=functools.partial(jax_fa3.flax.linen.dot_product_attention,
                                       is_causal=True, mask_structure="padding"))
    y = layer.apply(variables, x, mask=nn.make_causal_mask(tokens))
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes

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
  force_fp32_for_softmax=False,
  einsum_dot_general=None,
  qk_attn_weights_einsum=None,
  attn_weights_value_einsum=None,
  *,
  is_causal=False,
  segment_ids=None,
  sinks=None,
  mask_structure=None,
  strict=False,
  context_parallel="auto",
):
  """`flax.linen.dot_product_attention` on jax_fa3's kernels, where they can serve the call.

  Takes every argument of `flax.linen.dot_product_attention`, by name, since
  `MultiHeadDotProductAttention` passes only those its `attention_fn` names. The kernels
  serve a call with bfloat16 or float16 inputs (after promotion to `dtype`), no `bias`, no
  dropout while training, no `module` (sow_weights=False), no custom einsums, and a `mask`
  only if `mask_structure="padding"`. They compute the softmax in float32, so `precision`
  and `force_fp32_for_softmax` need nothing more from them.

  Any other call runs `flax.linen.dot_product_attention` instead, after a warning that
  names the argument (once per reason); with `strict=True` it raises that error instead.
  Shapes Flax's attention can't take either (ranks below 3 or unequal, unequal batch dims,
  a `mask` that does not broadcast to [batch..., heads, q_length, kv_length]) raise a
  ValueError, with or without `strict`.

  Keyword-only arguments, set them with `functools.partial`:
    is_causal: causal attention (query i sees key j <= i), as in `flax.nnx` and `jax.nn`,
      combined with `mask` by logical and. linen passes no causal flag, only a dense
      mask, so a causal model sets this, and mask_structure="padding" if it still passes
      the mask of `make_causal_mask`.
    mask_structure: None: `mask` may be any mask, and Flax's attention runs whenever one
      is given. "padding": `mask` only marks right padding: for each sequence it keeps
      the first q_len queries and the first kv_len keys (and is combined with
      `is_causal`), as `make_attention_mask(tokens != pad, tokens != pad)` does, also
      combined with `make_causal_mask` by `combine_masks`. The kernels then take those
      lengths, and check on the device that the mask is exactly that: if it is not, the
      output is all NaN, never a wrong number.
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
  query, key, value = dtypes.promote_dtype(query, key, value, dtype=dtype)
  _adapter.check_shapes(query, key, value, mask)
  try:
    if einsum_dot_general or qk_attn_weights_einsum or attn_weights_value_einsum:
      raise ValueError(
        "jax_fa3.flax: einsum_dot_general, qk_attn_weights_einsum and "
        "attn_weights_value_einsum must be None on the kernels, which run "
        "their own matrix products"
      )
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
  if is_causal:
    causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  return nn.dot_product_attention(
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
    force_fp32_for_softmax,
    einsum_dot_general=einsum_dot_general,
    qk_attn_weights_einsum=qk_attn_weights_einsum,
    attn_weights_value_einsum=attn_weights_value_einsum,
  )


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`flax.linen.MultiHeadDotProductAttention` with jax_fa3's `dot_product_attention` as
  its default `attention_fn`. For a causal or padding mask, pass
  `attention_fn=functools.partial(dot_product_attention, is_causal=True, ...)`.

  `sinks=True` adds attention sinks (as in gpt-oss): a learnable float32 `[num_heads]`
  parameter "sinks", initialised to zeros, passed to the attention function.
  """

  attention_fn: Callable[..., jax.Array] = dot_product_attention
  sinks: bool = False

  @nn.compact
  def __call__(self, *args, segment_ids=None, **kwargs):
    """Flax's call; `segment_ids` (packed documents, `[batch..., length]`) goes to the
    attention function."""
    sinks = (
      self.param("sinks", nn.initializers.zeros_init(), (self.num_heads,), jnp.float32)
      if self.sinks
      else None
    )
    with _adapter.module_call(segment_ids, sinks):
      return super().__call__(*args, **kwargs)
