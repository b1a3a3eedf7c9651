"""jax_fa3.flax on the reference path: equal to Flax's own attention, functions and modules.

"Equal" is FlashAttention's accuracy rule: ours is at most twice as far from Flax's
attention computed in float32 as Flax's own bfloat16 result is, plus two roundings of the
result: Flax on the CPU may round only once, at the end, as the float32 computation does,
and the backward pass reads the rounded output, as FlashAttention's does. Every call here
passes strict=True (or checks the kernels' primitive ran), so a silent fallback to Flax
fails the test.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jax_fa3.flax

pytestmark = pytest.mark.usefixtures("on_cpu")


def assert_as_close_as_flax(ours, flax_low, flax_f32, what=""):
  """max|ours - truth| <= 2 max|Flax in bfloat16 - truth| + 2 eps max|truth|, leaf by leaf."""
  for index, (a, base, truth) in enumerate(zip(*map(jax.tree.leaves, (ours, flax_low, flax_f32)))):
    assert a.dtype == base.dtype and a.shape == base.shape, (what, index)
    truth = np.asarray(truth, np.float64)
    two_roundings = 2 * float(jnp.finfo(a.dtype).eps) * np.abs(truth).max()
    error = np.abs(np.asarray(a, np.float64) - truth).max()
    base_error = np.abs(np.asarray(base, np.float64) - truth).max()
    assert error <= 2 * base_error + two_roundings, (
      f"{what} leaf {index}: {error} > 2 * {base_error} + {two_roundings}"
    )


def in_float32(attention_fn):
  """`attention_fn` computed in float32, its result rounded to the inputs' dtype."""

  @functools.wraps(attention_fn)  # linen passes only the arguments the signature names
  def attention(query, key, value, *args, dtype=None, **kwargs):
    del dtype
    upcast = (x.astype(jnp.float32) for x in (query, key, value))
    return attention_fn(*upcast, *args, dtype=jnp.float32, **kwargs).astype(query.dtype)

  return attention


def out_and_grads(attention, q, k, v, dout):
  out, pullback = jax.vjp(attention, q, k, v)
  return out, pullback(dout)


def padding_mask(make_attention_mask, query_lengths, key_lengths, seqlen_q, seqlen_k):
  """Flax's padding mask [batch, 1, T, S] for right-padded sequences of these lengths."""
  valid_q = jnp.arange(seqlen_q) < jnp.array(query_lengths)[:, None]
  valid_k = jnp.arange(seqlen_k) < jnp.array(key_lengths)[:, None]
  return make_attention_mask(valid_q, valid_k)


# --- nnx.dot_product_attention -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  query: tuple[int, ...]  # [batch..., T, N, H]
  key: tuple[int, ...]  # [batch..., S, K, H]
  is_causal: bool = False
  query_lengths: tuple[int, ...] | None = None  # a padding mask, per sequence
  key_lengths: tuple[int, ...] | None = None

  def __str__(self):
    return "-".join(
      f"{f.name}={getattr(self, f.name)}".replace(" ", "")
      for f in dataclasses.fields(self)
      if getattr(self, f.name) is not None
    )

  def mask(self):
    """The padding mask [batch..., 1, T, S], or None."""
    if self.query_lengths is None:
      return None
    mask = padding_mask(
      nnx.make_attention_mask, self.query_lengths, self.key_lengths, self.query[-3], self.key[-3]
    )
    return mask.reshape(*self.query[:-3], *mask.shape[1:])


NNX_CASES = [
  Case((2, 20, 8, 32), (2, 37, 2, 32)),  # GQA, cross attention
  Case((2, 9, 4, 64), (2, 40, 1, 64), is_causal=True),  # MQA, T < S
  Case((2, 32, 4, 32), (2, 32, 2, 32), query_lengths=(32, 5), key_lengths=(32, 11)),
  Case(
    (3, 24, 4, 32),
    (3, 24, 4, 32),
    is_causal=True,
    query_lengths=(24, 0, 13),
    key_lengths=(24, 0, 7),
  ),  # an empty sequence
  Case(
    (2, 3, 16, 2, 32),
    (2, 3, 16, 2, 32),
    is_causal=True,
    query_lengths=(16, 4, 9, 1, 16, 2),
    key_lengths=(16, 4, 9, 1, 16, 2),
  ),  # 2 batch dims
]


@pytest.mark.parametrize("case", NNX_CASES, ids=str)
def test_nnx_function_equals_flax(case, normal):
  """Outputs and gradients, with padding masks, GQA, causal and extra batch dims."""
  q, k, v, dout = normal(case.query), normal(case.key), normal(case.key), normal(case.query)
  mask = case.mask()
  ours = functools.partial(
    jax_fa3.flax.nnx.dot_product_attention, mask_structure="padding", strict=True
  )

  def run(attention_fn):
    attention = lambda q, k, v: attention_fn(q, k, v, mask=mask, is_causal=case.is_causal)
    return jax.jit(out_and_grads, static_argnums=0)(attention, q, k, v, dout)

  assert_as_close_as_flax(
    run(ours), run(nnx.dot_product_attention), run(in_float32(nnx.dot_product_attention))
  )


def test_nnx_function_runs_the_kernels_primitive(normal):
  q = normal((2, 16, 4, 32))
  mask = padding_mask(nnx.make_attention_mask, (16, 3), (16, 3), 16, 16)
  jaxpr = jax.make_jaxpr(
    lambda q: jax_fa3.flax.nnx.dot_product_attention(
      q, q, q, mask=mask, is_causal=True, mask_structure="padding"
    )
  )(q)
  assert "fa3_fwd" in str(jaxpr)


def test_nnx_function_serves_a_causal_mask_declared_padding(normal):
  """make_causal_mask combined with is_causal=True leaves no padding: served as causal."""
  q, k, v, dout = (normal((2, 24, 4, 32)) for _ in range(4))
  mask = nnx.make_causal_mask(jnp.zeros((2, 24)))
  ours = functools.partial(
    jax_fa3.flax.nnx.dot_product_attention, is_causal=True, mask_structure="padding", strict=True
  )

  def run(attention_fn):
    attention = lambda q, k, v: attention_fn(q, k, v, mask=mask)
    return jax.jit(out_and_grads, static_argnums=0)(attention, q, k, v, dout)

  assert_as_close_as_flax(
    run(ours), run(nnx.dot_product_attention), run(in_float32(nnx.dot_product_attention))
  )


# --- nnx.MultiHeadAttention ------------------------------------------------------------


def _nnx_layers(num_kv_heads=None, decode=False):
  """jax_fa3's MultiHeadAttention (strict, declaring padding masks), Flax's, and Flax's
  with float32 attention, with equal weights."""
  make = lambda: dict(
    num_heads=4,
    in_features=64,
    num_kv_heads=num_kv_heads,
    dtype=jnp.bfloat16,
    decode=decode,
    rngs=nnx.Rngs(0),
  )
  ours = functools.partial(
    jax_fa3.flax.nnx.dot_product_attention, mask_structure="padding", strict=True
  )
  return (
    jax_fa3.flax.nnx.MultiHeadAttention(**make(), attention_fn=ours),
    nnx.MultiHeadAttention(**make()),
    nnx.MultiHeadAttention(**make(), attention_fn=in_float32(nnx.dot_product_attention)),
  )


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_nnx_module_equals_flax(num_kv_heads, padded, normal):
  """jax_fa3.flax.nnx.MultiHeadAttention against nnx.MultiHeadAttention: MHA, GQA, MQA,
  causal, with and without a padding mask."""
  x = normal((2, 24, 64))
  mask = padding_mask(nnx.make_attention_mask, (24, 10), (24, 10), 24, 24) if padded else None
  layers = _nnx_layers(num_kv_heads)
  assert_as_close_as_flax(*(layer(x, mask=mask, is_causal=True) for layer in layers))


def test_nnx_default_module_uses_the_kernels(normal):
  layer = jax_fa3.flax.nnx.MultiHeadAttention(
    num_heads=4, in_features=64, decode=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
  )
  assert layer.attention_fn is jax_fa3.flax.nnx.dot_product_attention
  assert "fa3_fwd" in str(jax.make_jaxpr(lambda x: layer(x, is_causal=True))(normal((2, 8, 64))))


def test_nnx_decode_with_the_cache_mask(normal):
  """Token-by-token decoding: the cache's occupancy mask is a key padding mask."""
  layers = _nnx_layers(num_kv_heads=2, decode=True)
  x = normal((2, 4, 64))
  for layer in layers:
    layer.init_cache(x.shape, dtype=jnp.bfloat16)
  for t in range(x.shape[1]):
    assert_as_close_as_flax(*(layer(x[:, t : t + 1]) for layer in layers), what=f"step {t}")


# --- linen ------------------------------------------------------------------------------

LINEN_MASKS = {
  "causal": lambda: nn.make_causal_mask(jnp.zeros((2, 24))),
  "causal_and_padding": lambda: nn.combine_masks(
    nn.make_causal_mask(jnp.zeros((2, 24))),
    padding_mask(nn.make_attention_mask, (24, 9), (24, 9), 24, 24),
  ),
  "padding": lambda: padding_mask(nn.make_attention_mask, (17, 24), (20, 3), 24, 24),
}


@pytest.mark.parametrize("mask_kind", LINEN_MASKS)
def test_linen_module_equals_flax(mask_kind, normal):
  """The masks linen users build: causal, and padding alone or combined with causal. linen
  passes no causal flag, so the causal ones declare it with is_causal=True."""
  attention_fn = functools.partial(
    jax_fa3.flax.linen.dot_product_attention,
    is_causal=mask_kind != "padding",
    mask_structure="padding",
    strict=True,
  )
  layers = [
    jax_fa3.flax.linen.MultiHeadDotProductAttention(
      num_heads=4, dtype=jnp.bfloat16, attention_fn=attention_fn
    ),
    nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16),
    nn.MultiHeadDotProductAttention(
      num_heads=4, dtype=jnp.bfloat16, attention_fn=in_float32(nn.dot_product_attention)
    ),
  ]
  x, mask = normal((2, 24, 64)), LINEN_MASKS[mask_kind]()
  variables = layers[0].init(jax.random.key(0), x, mask=mask)
  assert_as_close_as_flax(*(layer.apply(variables, x, mask=mask) for layer in layers))


def test_linen_function_gradients_equal_flax(normal):
  q, k, v, dout = (normal((2, 24, 4, 32)) for _ in range(4))
  mask = LINEN_MASKS["causal_and_padding"]()
  ours = functools.partial(
    jax_fa3.flax.linen.dot_product_attention, is_causal=True, mask_structure="padding", strict=True
  )

  def run(attention_fn):
    attention = lambda q, k, v: attention_fn(q, k, v, mask=mask)
    return jax.jit(out_and_grads, static_argnums=0)(attention, q, k, v, dout)

  assert_as_close_as_flax(
    run(ours), run(nn.dot_product_attention), run(in_float32(nn.dot_product_attention))
  )


def test_linen_default_module_uses_the_kernels(normal):
  layer = jax_fa3.flax.linen.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16)
  x = normal((2, 8, 64))
  variables = layer.init(jax.random.key(0), x)
  assert "fa3_fwd" in str(jax.make_jaxpr(lambda x: layer.apply(variables, x))(x))


# --- Packed documents ---------------------------------------------------------------


def _document_ids():
  """Two rows of packed documents, the second padded at the end."""
  return jnp.array([[0] * 5 + [1] * 9 + [2] * 10, [0] * 12 + [1] * 7 + [-1] * 5], jnp.int32)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_nnx_module_takes_segment_ids(num_kv_heads, normal):
  """segment_ids in the module call: equal to Flax's modules given the document mask."""
  x = normal((2, 24, 64))
  ids = _document_ids()
  documents = (
    nnx.make_attention_mask(ids, ids, jnp.equal, dtype=bool) & (ids >= 0)[:, None, :, None]
  )
  ours, *flax_layers = _nnx_layers(num_kv_heads)
  assert "fa3_fwd" in str(jax.make_jaxpr(lambda x: ours(x, segment_ids=ids, is_causal=True))(x))
  assert_as_close_as_flax(
    ours(x, segment_ids=ids, is_causal=True),
    *(layer(x, mask=documents, is_causal=True) for layer in flax_layers),
  )


def test_linen_module_takes_segment_ids(normal):
  x = normal((2, 24, 64))
  ids = _document_ids()
  documents = nn.make_attention_mask(ids, ids, jnp.equal, dtype=bool) & (ids >= 0)[:, None, :, None]
  strict = functools.partial(jax_fa3.flax.linen.dot_product_attention, is_causal=True, strict=True)
  ours = jax_fa3.flax.linen.MultiHeadDotProductAttention(
    num_heads=4, dtype=jnp.bfloat16, attention_fn=strict
  )
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16)
  in_f32 = nn.MultiHeadDotProductAttention(
    num_heads=4, dtype=jnp.bfloat16, attention_fn=in_float32(nn.dot_product_attention)
  )
  variables = theirs.init(jax.random.key(0), x)
  mask = nn.combine_masks(documents, nn.make_causal_mask(ids))
  assert_as_close_as_flax(
    ours.apply(variables, x, segment_ids=ids),
    theirs.apply(variables, x, mask=mask),
    in_f32.apply(variables, x, mask=mask),
  )


@pytest.mark.parametrize("causal", [False, True])
def test_a_document_mask_declared_segments(causal, normal):
  q, k, v = normal((2, 24, 4, 16)), normal((2, 24, 2, 16)), normal((2, 24, 2, 16))
  ids = _document_ids()
  documents = (
    nnx.make_attention_mask(ids, ids, jnp.equal, dtype=bool) & (ids >= 0)[:, None, :, None]
  )
  ours = jax_fa3.flax.nnx.dot_product_attention(
    q, k, v, mask=documents, is_causal=causal, mask_structure="segments", strict=True
  )
  low, f32 = (
    jax.jit(
      lambda q, k, v: in_float32(nnx.dot_product_attention)(
        q, k, v, mask=documents, is_causal=causal
      )
    )(q, k, v)
    if dtype == "f32"
    else nnx.dot_product_attention(q, k, v, mask=documents, is_causal=causal)
    for dtype in ("low", "f32")
  )
  assert_as_close_as_flax(ours, low, f32)


def test_a_mask_that_is_not_of_documents_gives_nan(normal):
  q = normal((1, 8, 2, 16))
  mask = jnp.ones((1, 1, 8, 8), bool).at[0, 0, 3, 5].set(False)
  out = jax_fa3.flax.nnx.dot_product_attention(
    q, q, q, mask=mask, mask_structure="segments", strict=True
  )
  assert np.isnan(np.asarray(out, np.float32)).all()


def test_segment_ids_fall_back_to_flax_with_their_mask(normal):
  """Where the kernels can't serve (float32), Flax's attention runs with the documents."""
  q, k, v = (normal((2, 24, 4, 16)).astype(jnp.float32) for _ in range(3))
  ids = _document_ids()
  documents = (
    nnx.make_attention_mask(ids, ids, jnp.equal, dtype=bool) & (ids >= 0)[:, None, :, None]
  )
  with pytest.warns(UserWarning, match="Running Flax's attention instead"):
    ours = jax_fa3.flax.nnx.dot_product_attention(q, k, v, segment_ids=ids)
  np.testing.assert_allclose(ours, nnx.dot_product_attention(q, k, v, mask=documents), atol=1e-6)


def _attention_with_sinks(query, key, value, sinks, mask):
  """Attention with sinks written from the definition, in float32: [B, T, N, H] inputs."""
  scores = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), key.astype(jnp.float32))
  scores = jnp.where(mask, scores * query.shape[-1] ** -0.5, -jnp.inf)
  sink = jnp.broadcast_to(sinks[None, :, None, None], (*scores.shape[:3], 1))
  probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
  return jnp.einsum("bnts,bsnh->btnh", probs, value.astype(jnp.float32))


def test_nnx_module_with_sinks_learns_them(normal):
  """sinks=True: a zero-initialised [num_heads] parameter that reaches the kernels, whose
  output is attention with the sink column, and which gets a gradient."""
  layer = jax_fa3.flax.nnx.MultiHeadAttention(
    num_heads=4,
    in_features=64,
    dtype=jnp.bfloat16,
    decode=False,
    rngs=nnx.Rngs(0),
    sinks=True,
    attention_fn=functools.partial(jax_fa3.flax.nnx.dot_product_attention, strict=True),
  )
  assert layer.sinks[...].shape == (4,) and (layer.sinks[...] == 0).all()
  layer.sinks[...] = jnp.array([0.0, 1.0, -1.0, 3.0])
  x = normal((2, 24, 64))
  ids = _document_ids()
  captured = {}

  def probe(query, key, value, **kwargs):  # the projections the module feeds its attention
    captured.update(query=query, key=key, value=value)
    return jax_fa3.flax.nnx.dot_product_attention(query, key, value, **kwargs)

  layer.attention_fn = functools.partial(probe, strict=True)
  y = layer(x, segment_ids=ids, is_causal=True)
  mask = (
    (ids[:, :, None] == ids[:, None, :])
    & (ids >= 0)[:, :, None]
    & jnp.tril(jnp.ones((24, 24), bool))
  )
  expected = _attention_with_sinks(
    captured["query"], captured["key"], captured["value"], layer.sinks[...], mask[:, None]
  )
  out = layer.out(expected.astype(jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(out, np.float32), atol=3e-2)

  grads = nnx.grad(lambda m: m(x, segment_ids=ids, is_causal=True).astype(jnp.float32).sum())(layer)
  assert grads.sinks[...].shape == (4,) and jnp.isfinite(grads.sinks[...]).all()
  assert (grads.sinks[...] != 0).any()


def test_linen_module_with_sinks_has_the_parameter(normal):
  x = normal((2, 16, 32))
  layer = jax_fa3.flax.linen.MultiHeadDotProductAttention(
    num_heads=4,
    dtype=jnp.bfloat16,
    sinks=True,
    attention_fn=functools.partial(
      jax_fa3.flax.linen.dot_product_attention, is_causal=True, strict=True
    ),
  )
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["sinks"].shape == (4,)
  assert "fa3_fwd" in str(jax.make_jaxpr(lambda v: layer.apply(v, x))(variables))
  grads = jax.grad(lambda v: layer.apply(v, x).astype(jnp.float32).sum())(variables)
  assert jnp.isfinite(grads["params"]["sinks"]).all()


def test_sinks_never_fall_back_to_flax(normal):
  """Flax's attention has no sinks: a call the kernels can't serve (dropout) raises."""
  q = normal((2, 16, 4, 32))
  with pytest.raises(ValueError, match="no fall-back"):
    jax_fa3.flax.nnx.dot_product_attention(
      q, q, q, sinks=jnp.zeros(4), dropout_rate=0.1, dropout_rng=jax.random.key(0)
    )


# --- context_parallel: how the kernels run a split sequence -----------------------------


@pytest.mark.parametrize(
  "attention_fn, kwargs, called",
  [
    (jax_fa3.flax.nnx.dot_product_attention, {}, "dot_product_attention"),
    (jax_fa3.flax.linen.dot_product_attention, {"is_causal": True}, "dot_product_attention"),
    (
      jax_fa3.flax.nnx.dot_product_attention,
      {"sinks": np.zeros((4,), np.float32)},
      "flash_attention",
    ),
    (
      jax_fa3.flax.linen.dot_product_attention,
      {"segment_ids": np.zeros((2, 16), np.int32)},
      "flash_attention",
    ),
  ],
  ids=["nnx", "linen-causal", "nnx-sinks", "linen-segments"],
)
def test_context_parallel_reaches_the_kernels(attention_fn, kwargs, called, normal, monkeypatch):
  """The option goes to the jax_fa3 function that serves the call."""
  seen = []
  original = getattr(jax_fa3, called)

  def spy(*args, **spy_kwargs):
    seen.append(spy_kwargs.get("context_parallel"))
    return original(*args, **spy_kwargs)

  monkeypatch.setattr(jax_fa3, called, spy)
  q, k, v = (normal((2, 16, 4, 32), jnp.bfloat16) for _ in range(3))
  attention_fn(q, k, v, strict=True, context_parallel="all_gather", **kwargs)
  assert seen == ["all_gather"]


@pytest.mark.parametrize(
  "attention_fn", [jax_fa3.flax.nnx.dot_product_attention, jax_fa3.flax.linen.dot_product_attention]
)
def test_a_bad_context_parallel_never_falls_back(attention_fn, normal):
  q, k, v = (normal((2, 16, 4, 32), jnp.bfloat16) for _ in range(3))
  with pytest.raises(ValueError, match="jax_fa3.flax: context_parallel must be one of 'auto'"):
    attention_fn(q, k, v, context_parallel="zigzag")
