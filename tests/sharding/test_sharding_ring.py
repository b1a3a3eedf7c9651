"""Sequence sharding: ring attention (context_parallel="ring"), striped for causal masks."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jax_fa3
from jax_fa3 import _kernels
from jax_fa3._kernels import KernelStatus, Variant

SEQ = P(None, "seq")
RING = dict(context_parallel="ring")  # these tests' small chunks would be all-gathered


def qkv_dout(
  normal, seqlen_q=32, seqlen_k=None, heads=4, kv_heads=2, batch=2, head_dim=16, dtype=jnp.float16
):
  q_shape = (batch, seqlen_q, heads, head_dim)
  kv_shape = (batch, seqlen_k or seqlen_q, kv_heads, head_dim)
  return [normal(s, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape)]


@pytest.mark.parametrize(
  "seqlen, window, striped",
  [
    (32, (-1, -1), False),  # every block whole: contiguous
    (32, (-1, 0), True),  # causal: striped
    (36, (-1, 0), False),  # causal, 36 not a multiple of 4 * 4: contiguous, unbalanced
    (32, (-1, 3), True),  # causal shifted right by 3: striped
    (32, (6, 0), False),  # a band: contiguous, blocks outside it skipped
  ],
  ids=["full", "causal", "causal-contiguous", "right-window", "band"],
)
def test_ring(seqlen, window, striped, normal, compare, make_mesh, collectives, forward_and_vjp):
  """K/V chunks go round the ring (collective-permutes), nothing is gathered; the striped
  layout adds the all-to-alls that restripe the arrays."""
  mesh = make_mesh((4,), ("seq",))
  attention = functools.partial(jax_fa3.flash_attention, window_size=window, **RING)
  actual, hlo = compare(forward_and_vjp(attention), qkv_dout(normal, seqlen), [SEQ] * 4, mesh)
  expected = {"collective-permute", "all-to-all"} if striped else {"collective-permute"}
  assert collectives(hlo) == expected
  assert actual["out"].sharding.spec[1] == "seq"


def test_ring_of_eight_bfloat16(normal, compare, make_mesh, collectives, forward_and_vjp):
  mesh = make_mesh((8,), ("seq",))
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **RING)
  _, hlo = compare(
    forward_and_vjp(attention), qkv_dout(normal, 64, dtype=jnp.bfloat16), [SEQ] * 4, mesh
  )
  assert "all-gather" not in collectives(hlo)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_batch_sequence_and_heads_together(
  explicit, normal, compare, make_mesh, collectives, forward_and_vjp
):
  mesh = make_mesh((2, 2, 2), ("data", "seq", "model"), explicit)
  attention = functools.partial(jax_fa3.flash_attention, causal=True, **RING)
  spec = P("data", "seq", "model")
  _, hlo = compare(
    forward_and_vjp(attention), qkv_dout(normal, heads=8, kv_heads=4), [spec] * 4, mesh
  )
  assert collectives(hlo) == {"collective-permute", "all-to-all"}


def test_cross_attention_of_different_lengths(
  normal, compare, make_mesh, collectives, forward_and_vjp
):
  """Without a mask the chunks of q and of k/v may differ in length."""
  mesh = make_mesh((4,), ("seq",))
  _, hlo = compare(
    forward_and_vjp(functools.partial(jax_fa3.flash_attention, **RING)),
    qkv_dout(normal, seqlen_q=16, seqlen_k=48),
    [SEQ] * 4,
    mesh,
  )
  assert collectives(hlo) == {"collective-permute"}


def test_dot_product_attention_with_lengths(
  normal, compare, make_mesh, collectives, forward_and_vjp
):
  """Per-sequence lengths on a striped ring; jax.nn's handling of rows that see no key
  (the mean of the values) reduces over the sequence, hence the all-reduce."""
  mesh = make_mesh((2, 4), ("data", "seq"))
  q, k, v, dout = qkv_dout(normal, batch=4)
  lengths_q, lengths_kv = jnp.array([5, 32, 0, 19], jnp.int32), jnp.array([32, 3, 17, 0], jnp.int32)

  def run(q, k, v, dout, lengths_q, lengths_kv):
    attention = functools.partial(
      jax_fa3.dot_product_attention,
      is_causal=True,
      query_seq_lengths=lengths_q,
      key_value_seq_lengths=lengths_kv,
      **RING,
    )
    return forward_and_vjp(attention)(q, k, v, dout)

  spec = P("data", "seq")
  _, hlo = compare(run, [q, k, v, dout, lengths_q, lengths_kv], [spec] * 4 + [P("data")] * 2, mesh)
  assert "all-gather" not in collectives(hlo)


def test_lse_and_its_gradient(normal, compare, make_mesh):
  mesh = make_mesh((4,), ("seq",))
  q, k, v, dout = qkv_dout(normal)
  dlse = normal((2, 4, 32), jnp.float32)

  def run(q, k, v, dout, dlse):
    attention = functools.partial(jax_fa3.flash_attention, causal=True, return_lse=True, **RING)
    (out, lse), pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback((dout, dlse))
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)

  compare(run, [q, k, v, dout, dlse], [SEQ] * 4 + [P(None, None, "seq")], mesh)


def test_scan_over_layers(normal, compare, make_mesh):
  mesh = make_mesh((2, 4), ("data", "seq"))
  x, layers = normal((2, 32, 4, 16), jnp.float16), normal((3, 2, 32, 4, 16), jnp.float16)

  def loss(x, layers):
    step = lambda x, kv: (jax_fa3.flash_attention(x, kv, kv, causal=True, **RING) + x, None)
    return jnp.sum(jax.lax.scan(step, x, layers)[0].astype(jnp.float32) ** 2)

  grads = lambda x, layers: dict(zip(("dx", "dlayers"), jax.grad(loss, (0, 1))(x, layers)))
  compare(grads, [x, layers], [P("data", "seq"), P(None, "data", "seq")], mesh)


def ring_program(normal, make_mesh, forward_and_vjp, causal=True):
  """The forward and backward of attention in Explicit mode over 4 devices, where the
  ring is traced with the arrays (with Auto axes it appears only at compile time)."""
  mesh = make_mesh((4,), ("seq",), explicit=True)
  arrays = [
    jax.device_put(x, jax.sharding.NamedSharding(mesh, SEQ))
    for x in qkv_dout(normal, dtype=jnp.bfloat16)
  ]
  run = forward_and_vjp(functools.partial(jax_fa3.flash_attention, causal=causal, **RING))
  return jax.jit(run), arrays


def test_every_ppermute_carries_one_dtype(normal, make_mesh, forward_and_vjp):
  """XLA refuses a combined collective-permute of mixed float widths (jax#32148), and may
  combine any of them: the float32 dK/dV accumulators travel as bfloat16 words too."""
  fn, arrays = ring_program(normal, make_mesh, forward_and_vjp)
  ppermutes = [
    eqn for eqn in _equations(jax.make_jaxpr(fn)(*arrays).jaxpr) if eqn.primitive.name == "ppermute"
  ]
  assert ppermutes
  assert {v.aval.dtype for eqn in ppermutes for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
  "causal, calls, offsets",
  [
    (False, 4, {0}),  # one block a step, the same whatever the device
    (True, 7, {0, -1}),  # step 0, then two cases a step: t <= r (offset 0) and t > r (-1)
  ],
  ids=["full", "causal"],
)
def test_the_kernel_path_composes_the_ffi_calls(
  causal, calls, offsets, normal, make_mesh, forward_and_vjp, monkeypatch
):
  """Lowered for CUDA (with a faked kernel table), each ring step calls the FFI targets
  with its static mask."""
  variants = tuple(Variant(d, "bfloat16", "bfloat16", 16, 16) for d in ("fwd", "bwd"))
  monkeypatch.setattr(_kernels, "_status", KernelStatus(variants))
  fn, arrays = ring_program(normal, make_mesh, forward_and_vjp, causal)
  text = jax.jit(lambda *a: fn(*a)).trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()
  for target in ("jax_fa3_fwd", "jax_fa3_bwd"):
    lines = [line for line in text.splitlines() if f"stablehlo.custom_call @{target}(" in line]
    found = {int(o) for line in lines for o in re.findall(r"diagonal_offset = (-?\d+)", line)}
    assert (len(lines), found) == (calls, offsets), target
  assert "stablehlo.collective_permute" in text


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in jax.tree.leaves(eqn.params, is_leaf=lambda p: hasattr(p, "eqns")):
      if hasattr(param, "eqns"):
        yield from _equations(param)
      elif hasattr(param, "jaxpr"):
        yield from _equations(param.jaxpr)
