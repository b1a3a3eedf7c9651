"""Sequence sharding by all-gathering K/V (context_parallel="all_gather"), zigzag for masks
bounded on one side, against the unsharded call; and the choice between it and the ring."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa3
from jax_fa3 import _kernels, sharding
from jax_fa3._kernels import KernelStatus, Variant
from jax_fa3.primitives import AttentionParams
from sharding_checks import assert_all_gather

SEQ = P(None, "seq")
GATHER = dict(context_parallel="all_gather")


def qkv_dout(
  normal, seqlen_q=32, seqlen_k=None, heads=4, kv_heads=2, batch=2, head_dim=16, dtype=jnp.float16
):
  q_shape = (batch, seqlen_q, heads, head_dim)
  kv_shape = (batch, seqlen_k or seqlen_q, kv_heads, head_dim)
  return [normal(s, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


def split_of(mesh, q_shape, k_shape, window, context_parallel="auto", spec=SEQ):
  return sharding.choose_split(
    dict(mesh.shape),
    spec,
    spec,
    q_shape,
    k_shape,
    AttentionParams(1.0, window_left=window[0], window_right=window[1]),
    context_parallel=context_parallel,
  )


@pytest.mark.parametrize(
  "seqlen, window, zigzag",
  [
    (32, (-1, -1), False),  # no mask: one call per device
    (32, (-1, 0), True),  # causal: zigzag, 8 halves of 4
    (36, (-1, 0), False),  # causal, 36 not a multiple of 2 * 4: contiguous, unbalanced
    (32, (-1, 3), True),  # causal shifted right by 3
    (32, (5, -1), True),  # bounded on the left only
    (32, (6, 0), False),  # a band: contiguous
  ],
  ids=["full", "causal", "causal-contiguous", "right-window", "left-window", "band"],
)
def test_all_gather(seqlen, window, zigzag, normal, compare, make_mesh, forward_and_vjp):
  """GQA (the k/v heads, not q's, are gathered); outputs and gradients sharded like q."""
  mesh = make_mesh((4,), ("seq",))
  arrays = qkv_dout(normal, seqlen)
  split = split_of(mesh, arrays[0].shape, arrays[1].shape, window, "all_gather")
  assert (split.strategy, split.zigzag) == ("all_gather", zigzag)
  attention = functools.partial(jax_fa3.flash_attention, window_size=window, **GATHER)
  actual, hlo = compare(forward_and_vjp(attention), arrays, [SEQ] * 4, mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=zigzag)
  for x in actual.values():
    assert x.sharding.spec[1] == "seq"


def test_all_gather_of_eight_bfloat16(normal, compare, make_mesh, forward_and_vjp):
  mesh = make_mesh((8,), ("seq",))
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **GATHER)
  _, hlo = compare(
    forward_and_vjp(attention), qkv_dout(normal, 64, dtype=jnp.bfloat16), [SEQ] * 4, mesh
  )
  assert_all_gather(hlo, kv_heads=2, zigzag=True)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_batch_sequence_and_heads_together(explicit, normal, compare, make_mesh, forward_and_vjp):
  mesh = make_mesh((2, 2, 2), ("data", "seq", "model"), explicit)
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **GATHER)
  spec = P("data", "seq", "model")
  _, hlo = compare(
    forward_and_vjp(attention), qkv_dout(normal, heads=8, kv_heads=4), [spec] * 4, mesh
  )
  # Two k/v heads a device (of 4, split over "model"), head dim 16.
  assert_all_gather(hlo, kv_heads=2, zigzag=True)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_more_head_shards_than_kv_heads(explicit, normal, compare, make_mesh, forward_and_vjp):
  """The sequence over 2 devices, 8 query heads over 4 and 2 k/v heads: each device slices
  its k/v head before the gather, and dK/dV are summed over the head shards after the
  reduce-scatter."""
  mesh = make_mesh((2, 4), ("seq", "model"), explicit)
  arrays = qkv_dout(normal, heads=8, kv_heads=2)
  q_spec, kv_spec = P(None, "seq", "model"), P(None, "seq")
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **GATHER)
  compare(forward_and_vjp(attention), arrays, [q_spec, kv_spec, kv_spec, q_spec], mesh)


def test_masked_lengths_the_ring_cannot_take(normal, compare, make_mesh, forward_and_vjp):
  """Causal with 32 queries and 40 keys on 4 devices: no ring (neither striped nor equal
  chunks), so "auto" all-gathers K/V, where it used to gather the whole sequence."""
  mesh = make_mesh((4,), ("seq",))
  arrays = qkv_dout(normal, seqlen_q=32, seqlen_k=40)
  split = split_of(mesh, arrays[0].shape, arrays[1].shape, (-1, 0))
  assert (split.strategy, split.zigzag) == ("all_gather", True)
  attention = functools.partial(jax_fa3.flash_attention, causal=True)
  _, hlo = compare(forward_and_vjp(attention), arrays, [SEQ] * 4, mesh)
  assert_all_gather(hlo, kv_heads=2, zigzag=True)


def test_cross_attention_of_different_lengths(normal, compare, make_mesh, forward_and_vjp):
  mesh = make_mesh((4,), ("seq",))
  attention = functools.partial(jax_fa3.flash_attention, **GATHER)
  _, hlo = compare(
    forward_and_vjp(attention), qkv_dout(normal, seqlen_q=16, seqlen_k=48), [SEQ] * 4, mesh
  )
  assert_all_gather(hlo, kv_heads=2)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_dot_product_attention_with_lengths(explicit, normal, compare, make_mesh, forward_and_vjp):
  """Per-sequence lengths (jax.nn's top-left causal mask), zigzag: each half's lengths are
  cut to its place; rows that see no key get jax.nn's mean of the values."""
  mesh = make_mesh((2, 4), ("data", "seq"), explicit)
  q, k, v, dout = qkv_dout(normal, batch=4)
  lengths_q, lengths_kv = jnp.array([5, 32, 0, 19], jnp.int32), jnp.array([32, 3, 17, 0], jnp.int32)

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
      **GATHER,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  spec = P("data", "seq")
  compare(run, [q, k, v, dout, lengths_q, lengths_kv], [spec] * 4 + [P("data")] * 2, mesh)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_and_its_gradient(causal, normal, compare, make_mesh):
  mesh = make_mesh((4,), ("seq",))
  q, k, v, dout = qkv_dout(normal)
  dlse = normal((2, 4, 32), jnp.float32)

  def run(q, k, v, dout, dlse):
    attention = functools.partial(
      jax_fa3.flash_attention, causal=causal, return_lse=True, deterministic=True, **GATHER
    )
    (out, lse), pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback((dout, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  compare(run, [q, k, v, dout, dlse], [SEQ] * 4 + [P(None, None, "seq")], mesh)


def test_scan_over_layers_by_default(normal, compare, make_mesh):
  """Small chunks: "auto" all-gathers (the cost model), under scan and grad."""
  mesh = make_mesh((2, 4), ("data", "seq"))
  x, layers = normal((2, 32, 4, 16), jnp.float16), normal((3, 2, 32, 4, 16), jnp.float16)

  def loss(x, layers):
    step = lambda x, kv: (jax_fa3.flash_attention(x, kv, kv, causal=True) + x, None)
    return jnp.sum(jax.lax.scan(step, x, layers)[0].astype(jnp.float32) ** 2)

  grads = lambda x, layers: dict(zip(("dx", "dlayers"), jax.grad(loss, (0, 1))(x, layers)))
  _, hlo = compare(grads, [x, layers], [P("data", "seq"), P(None, "data", "seq")], mesh)
  assert "reduce-scatter" in hlo and "all-to-all" not in hlo


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_forced_ring_that_cannot_run_is_refused(explicit, normal, make_mesh):
  """A ValueError naming the option and the rule; with Auto axes XLA reports it from the
  partitioner, with the message."""
  mesh = make_mesh((4,), ("seq",), explicit)
  sharded = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in qkv_dout(normal, 32, 40)[:3]]
  attention = functools.partial(jax_fa3.flash_attention, causal=True, context_parallel="ring")
  with pytest.raises(Exception, match=r"context_parallel='ring' cannot run this split: .* P \* P"):
    jax.jit(attention).lower(*sharded).compile()


def test_the_kernel_path_composes_the_ffi_calls(normal, make_mesh, forward_and_vjp, monkeypatch):
  """Lowered for CUDA (with a faked kernel table), causal on 4 devices: one switch branch a
  device, each with two calls, whose diagonal offsets place the halves 0..7 of 4 queries;
  forward and backward alike."""
  variants = tuple(Variant(d, "bfloat16", "bfloat16", 16, 16) for d in ("fwd", "bwd"))
  monkeypatch.setattr(_kernels, "_status", KernelStatus(variants))
  mesh = make_mesh((4,), ("seq",), explicit=True)
  arrays = [
    jax.device_put(x, NamedSharding(mesh, SEQ)) for x in qkv_dout(normal, dtype=jnp.bfloat16)
  ]
  run = forward_and_vjp(functools.partial(jax_fa3.flash_attention, causal=True, **GATHER))
  text = jax.jit(run).trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()
  for target in ("jax_fa3_fwd", "jax_fa3_bwd"):
    lines = [line for line in text.splitlines() if f"stablehlo.custom_call @{target}(" in line]
    found = sorted(int(o) for line in lines for o in re.findall(r"diagonal_offset = (-?\d+)", line))
    assert found == [4 * half for half in range(8)], target
  assert "stablehlo.collective_permute" in text and "stablehlo.all_gather" in text


@pytest.mark.parametrize("function", ["flash_attention", "dot_product_attention"])
@pytest.mark.parametrize("value", ["rings", "", None, True])
def test_bad_values_are_refused(function, value, normal):
  q, k, v, _ = qkv_dout(normal)
  with pytest.raises(ValueError, match=f"{function}: context_parallel must be one of 'auto'"):
    getattr(jax_fa3, function)(q, k, v, context_parallel=value)


def test_varlen_refuses_bad_values(normal):
  q, k, v = (normal((8, 2, 16), jnp.float16) for _ in range(3))
  cu = np.array([0, 3, 8], np.int32)
  with pytest.raises(ValueError, match="flash_attention_varlen: context_parallel must be"):
    jax_fa3.flash_attention_varlen(q, k, v, cu, cu, context_parallel="all-gather")
