"""jax_fa3.flax where the kernels can't serve a call: Flax's own attention runs, with a
warning once per reason; strict=True raises instead, naming the argument; a mask declared
padding that is not turns the output into NaN."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jax_fa3.flax
from jax_fa3.flax import _adapter

pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.fixture(autouse=True)
def fresh_warnings():
  """Each test sees the first warning of each reason."""
  _adapter._warn_once.cache_clear()  # pylint: disable=protected-access


def _qkv(normal, dtype=jnp.bfloat16, heads=4, kv_heads=4, head_dim=32):
  q = normal((2, 16, heads, head_dim), dtype)
  k, v = (normal((2, 16, kv_heads, head_dim), dtype) for _ in range(2))
  return q, k, v


def _unserved(normal):
  """Calls the kernels can't serve: (the argument the error names, q/k/v, keyword arguments)."""
  q, k, v = _qkv(normal)
  valid = jnp.arange(16) < jnp.array([16, 5])[:, None]
  return {
    "bias": (q, k, v, dict(bias=normal((2, 4, 16, 16)))),
    "mask": (q, k, v, dict(mask=nnx.make_causal_mask(jnp.zeros((2, 16))))),
    "dropout_rate": (
      q,
      k,
      v,
      dict(dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0)),
    ),
    "module": (q, k, v, dict(module=nnx.Module())),
    # float32, with a padding mask declared as such: not served all the same
    "float32": (*_qkv(normal, jnp.float32), dict(mask=nnx.make_attention_mask(valid, valid))),
    "head dims up to 256": (*_qkv(normal, head_dim=288), {}),
  }


SOW_DEPRECATED = "ignore:Using 'Module.sow:DeprecationWarning"  # flax 0.12.12 asks for nnx.capture


@pytest.mark.filterwarnings(SOW_DEPRECATED)
@pytest.mark.parametrize(
  "reason", ["bias", "mask", "dropout_rate", "module", "float32", "head dims up to 256"]
)
def test_nnx_falls_back_to_flax_once_and_raises_when_strict(reason, normal):
  q, k, v, kwargs = _unserved(normal)[reason]
  ours = functools.partial(
    jax_fa3.flax.nnx.dot_product_attention,
    q,
    k,
    v,
    **kwargs,
    mask_structure="padding" if reason == "float32" else None,
  )
  with pytest.warns(UserWarning, match=reason):
    out = ours()
  np.testing.assert_array_equal(out, nnx.dot_product_attention(q, k, v, **kwargs))
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    ours()  # the same reason warns once
  with pytest.raises((ValueError, TypeError), match=reason):
    ours(strict=True)


def test_nnx_dropout_while_not_training_is_served(normal):
  """strict=True: raises if the kernels do not serve it."""
  q, k, v = _qkv(normal)
  jax_fa3.flax.nnx.dot_product_attention(q, k, v, dropout_rate=0.1, deterministic=True, strict=True)


def test_nnx_float16_and_gqa_are_served(normal):
  q, k, v = _qkv(normal, jnp.float16, heads=8, kv_heads=2)
  jaxpr = jax.make_jaxpr(
    functools.partial(jax_fa3.flax.nnx.dot_product_attention, is_causal=True, strict=True)
  )(q, k, v)
  assert "fa3_fwd" in str(jaxpr)


@pytest.mark.filterwarnings(SOW_DEPRECATED)
def test_nnx_module_falls_back_when_sowing_weights(normal):
  """sow_weights=True passes `module`: Flax sows the weights; the output equals Flax's."""
  make = lambda attention_fn: nnx.MultiHeadAttention(
    num_heads=4,
    in_features=32,
    dtype=jnp.bfloat16,
    decode=False,
    rngs=nnx.Rngs(0),
    attention_fn=attention_fn,
  )
  ours, theirs = make(jax_fa3.flax.nnx.dot_product_attention), make(nnx.dot_product_attention)
  x = normal((2, 8, 32))
  with pytest.warns(UserWarning, match="module"):
    out = ours(x, sow_weights=True)
  np.testing.assert_array_equal(out, theirs(x, sow_weights=True))
  assert nnx.state(ours, nnx.Intermediate)["attention_weights"]


@pytest.mark.parametrize("reason", ["mask", "qk_attn_weights_einsum", "float32"])
def test_linen_falls_back_to_flax_and_raises_when_strict(reason, normal):
  """linen's own reasons: its custom einsums; a mask without mask_structure; float32. With
  is_causal=True, Flax's computation gets the causal mask combined in."""
  dtype = jnp.float32 if reason == "float32" else jnp.bfloat16
  q, k, v = _qkv(normal, dtype)
  mask = nn.make_attention_mask(
    jnp.arange(16) < jnp.array([16, 5])[:, None], jnp.ones((2, 16), bool)
  )
  kwargs = dict(mask=mask)
  if reason == "qk_attn_weights_einsum":
    kwargs.update(qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)
  ours = functools.partial(
    jax_fa3.flax.linen.dot_product_attention,
    q,
    k,
    v,
    **kwargs,
    is_causal=True,
    mask_structure=None if reason == "mask" else "padding",
  )
  with pytest.warns(UserWarning, match=reason):
    out = ours()
  causal_mask = nn.combine_masks(mask, nn.make_causal_mask(jnp.zeros((2, 16))))
  np.testing.assert_array_equal(
    out, nn.dot_product_attention(q, k, v, **dict(kwargs, mask=causal_mask))
  )
  with pytest.raises((ValueError, TypeError), match=reason):
    ours(strict=True)


def test_linen_module_falls_back_while_training_with_dropout(normal):
  layer = jax_fa3.flax.linen.MultiHeadDotProductAttention(
    num_heads=4, dtype=jnp.bfloat16, dropout_rate=0.1
  )
  x = normal((2, 8, 32))
  variables = layer.init(jax.random.key(0), x, deterministic=True)
  rngs = {"dropout": jax.random.key(1)}
  with pytest.warns(UserWarning, match="dropout_rate"):
    out = layer.apply(variables, x, deterministic=False, rngs=rngs)
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16, dropout_rate=0.1)
  np.testing.assert_array_equal(out, flax_layer.apply(variables, x, deterministic=False, rngs=rngs))


NOT_PADDING = {
  "left_padding": lambda valid: nnx.make_attention_mask(valid[:, ::-1], valid[:, ::-1]),
  "causal_without_is_causal": lambda valid: nnx.make_causal_mask(valid),
  "segments": lambda valid: nnx.make_attention_mask(valid, valid, jnp.equal),
  "one_head_differs": lambda valid: jnp.concatenate(
    [nnx.make_attention_mask(valid, valid)] * 3 + [jnp.ones((2, 1, 16, 16))], axis=1
  ),
}


@pytest.mark.parametrize("mask_kind", NOT_PADDING)
def test_mask_declared_padding_that_is_not_gives_nan(mask_kind, normal):
  """The device check: under jit the mask is unknown until it runs; a wrong declaration
  turns the output (and so the loss) into NaN rather than a wrong number."""
  q, k, v = _qkv(normal)
  valid = jnp.arange(16) < jnp.array([16, 5])[:, None]
  mask = NOT_PADDING[mask_kind](valid)
  attention = jax.jit(
    functools.partial(jax_fa3.flax.nnx.dot_product_attention, mask_structure="padding", strict=True)
  )
  assert np.isnan(np.asarray(attention(q, k, v, mask=mask), np.float32)).all()
  padding = nnx.make_attention_mask(valid, valid)
  assert not np.isnan(np.asarray(attention(q, k, v, mask=padding), np.float32)).any()


def test_unknown_mask_structure_is_an_error(normal):
  q, k, v = _qkv(normal)
  with pytest.raises(ValueError, match="mask_structure"):
    jax_fa3.flax.nnx.dot_product_attention(q, k, v, mask_structure="causal")


def _invalid_for_flax_too(normal):
  """Calls Flax's own attention can't run either: (the rule the error names, q/k/v, kwargs)."""
  q, k, v = _qkv(normal)
  key_valid = jnp.arange(12) < jnp.array([12, 5])[:, None]
  query_valid = jnp.arange(16) < jnp.array([16, 5])[:, None]
  return {
    "rank_2": (
      r"one rank of at least 3, got query \(16, 32\)",
      q[0, :, 0],
      k[0, :, 0],
      v[0, :, 0],
      {},
    ),
    "ranks_differ": (r"one rank of at least 3", q, k[0], v[0], {}),
    "batch_dims": (r"same batch dims", q, k[:1], v[:1], {}),
    "key_value_lengths": (r"key and value must have the same length", q, k, v[:, :12], {}),
    "head_dims": (r"same head_dim", q, k[..., :16], v, {}),
    "mask_key_length": (
      r"`mask` must broadcast to \[batch..., heads, q_length, kv_length\] = "
      r"\[2, 4, 16, 16\], got shape \(2, 1, 16, 12\)",
      q,
      k,
      v,
      dict(mask=nnx.make_attention_mask(query_valid, key_valid)),
    ),
  }


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
@pytest.mark.parametrize("mask_structure", [None, "padding"])
@pytest.mark.parametrize(
  "case",
  ["rank_2", "ranks_differ", "batch_dims", "key_value_lengths", "head_dims", "mask_key_length"],
)
def test_shapes_flax_refuses_raise_without_falling_back(flavour, mask_structure, case, normal):
  """Shapes Flax's attention can't take either: jax_fa3's ValueError naming the rule, raised
  before either runs, not a fall-back ending in an IndexError or a failed broadcast."""
  message, q, k, v, kwargs = _invalid_for_flax_too(normal)[case]
  attention = getattr(jax_fa3.flax, flavour).dot_product_attention
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # no fall-back warning either
    with pytest.raises(ValueError, match=message):
      attention(q, k, v, mask_structure=mask_structure, **kwargs)
