"""FP8 attention with the arrays sharded: the descales split with the batch and the heads
(sliced with the k/v head where there are more head shards than k/v heads), and a sequence
split, which would need the ring, refused."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa3

E4M3 = jnp.float8_e4m3fn


def fp8_forward(**kwargs):
  """(q, k, v, descale_k) -> out and lse of flash_attention on q, k, v rounded to e4m3 (the
  inputs stay bfloat16, so that the comparison's eps is bfloat16's)."""

  def run(q, k, v, descale_k):
    out, lse = jax_fa3.flash_attention(
      q.astype(E4M3),
      k.astype(E4M3),
      v.astype(E4M3),
      descale_q=0.5,
      descale_k=descale_k,
      descale_v=2.0,
      return_lse=True,
      **kwargs,
    )
    return dict(out=out, lse=lse)

  return run


def inputs(normal, heads, kv_heads, batch=4, seqlen=16, head_dim=16):
  q_shape, kv_shape = (batch, seqlen, heads, head_dim), (batch, seqlen, kv_heads, head_dim)
  descale_k = jnp.abs(normal((batch, kv_heads), jnp.float32)) + 0.5
  return [normal(q_shape), normal(kv_shape), normal(kv_shape), descale_k]


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_fp8_batch_and_heads_run_locally(explicit, normal, compare, make_mesh, collectives):
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  spec = P("data", None, "model")
  actual, hlo = compare(
    fp8_forward(causal=True), inputs(normal, 8, 4), [spec] * 3 + [P("data", "model")], mesh
  )
  assert collectives(hlo) == set()
  assert actual["out"].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_fp8_more_head_shards_than_kv_heads(explicit, normal, compare, make_mesh, collectives):
  """Each device slices the k/v head its queries read, and that head's descales."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  heads = P(None, None, "model")
  actual, _ = compare(fp8_forward(), inputs(normal, 8, 2), [heads, P(), P(), P()], mesh)
  assert actual["out"].sharding.spec[2] == "model"


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_fp8_attention_and_its_gradients_split_over_batch_and_heads(
  explicit, normal, compare, make_mesh, forward_and_vjp
):
  """Block-quantized q and k (descales [B, H, blocks], [B, Hk, blocks]) split with them."""
  mesh = make_mesh((2, 4), ("data", "model"), explicit)
  spec = P("data", None, "model")
  q, k, v, _ = inputs(normal, 8, 4, seqlen=300, head_dim=32)
  attention = functools.partial(jax_fa3.fp8_attention, causal=True)
  compare(forward_and_vjp(attention), [q, k, v, normal(q.shape)], [spec] * 4, mesh)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_fp8_on_a_ring_is_refused(explicit, normal, make_mesh):
  """A ValueError; with Auto axes XLA reports it from the partitioner, with the message."""
  mesh = make_mesh((4,), ("seq",), explicit)
  arrays = inputs(normal, 4, 2)
  sharded = [
    jax.device_put(x, NamedSharding(mesh, spec))
    for x, spec in zip(arrays, [P(None, "seq")] * 3 + [P()])
  ]
  with pytest.raises(
    Exception,
    match="float8_e4m3fn attention does not run as ring attention: q and "
    r"k are split over their sequence by mesh axes \('seq',\)",
  ):
    jax.jit(fp8_forward()).lower(*sharded).compile()
