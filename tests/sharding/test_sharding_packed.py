"""Packed sequences (segment ids, varlen) with the sequence split: ring attention whose
K/V chunks carry their rows (context_parallel="ring"), and all-gather attention whose
gathered keys' rows are cut to each device's queries (the default), against the unsharded
call and the float64 oracle."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_fa3
import oracle
from sharding_checks import assert_all_gather, assert_packed_ring
from jax_fa3 import _kernels, sharding
from jax_fa3._kernels import KernelStatus, Variant

SEQ = P(None, "seq")
RING = dict(context_parallel="ring")  # opt-in for packed sequences (strategy.plan)


def packed_ids(length, size):
  """Two rows over `size` chunks: documents straddling chunk boundaries (one over three
  chunks on 4 devices) with padding at the end; and documents wholly inside chunks, a
  run of padding inside a chunk, and one document over two chunks."""
  chunk = length // size
  straddling, doc = [], 0
  for n in [3, chunk + 2, 2 * chunk + 1, 1, chunk // 2]:
    straddling += [doc] * n
    doc += 1
  straddling = (straddling + [doc] * length)[: length - 3] + [-1] * 3
  inside = []
  for c in range(size):
    half = chunk // 2
    inside += [10 + 2 * c] * half + [11 + 2 * c] * (chunk - half)
  inside = np.array(inside)
  inside[chunk // 2 + 1 : chunk // 2 + 3] = -1
  inside[chunk + chunk // 2 : 2 * chunk + chunk // 2] = 99
  return np.stack([straddling, inside]).astype(np.int32)


def dense_mask(q_ids, kv_ids, window):
  """`[B, Sq, Sk]`: same document, not padding, and in the window (bottom-right)."""
  return oracle.segment_mask(q_ids, kv_ids, window, kv_ids.shape[1] - q_ids.shape[1])


def inputs(normal, seqlen_q, seqlen_k=None, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float16):
  seqlen_k = seqlen_k or seqlen_q
  q, dout = (normal((2, seqlen_q, heads, head_dim), dtype) for _ in range(2))
  k, v = (normal((2, seqlen_k, kv_heads, head_dim), dtype) for _ in range(2))
  dlse = normal((2, heads, seqlen_q), jnp.float32)
  return [q, k, v, dout, dlse]


def forward_and_vjp_with_lse(attention):
  """(q, k, v, dout, dlse, *ids) -> out, lse (0 where -inf, with `seen` saying where it is
  finite: the comparison subtracts) and the gradients for cotangents (dout, dlse)."""

  def run(q, k, v, dout, dlse, *ids):
    (out, lse), pullback = jax.vjp(lambda q, k, v: attention(q, k, v, *ids), q, k, v)
    dq, dk, dv = pullback((dout, dlse))
    seen = jnp.isfinite(lse)
    return dict(out=out, lse=jnp.where(seen, lse, 0.0), seen=seen, dq=dq, dk=dk, dv=dv)

  return run


def assert_matches_oracle(actual, q, k, v, dout, dlse, mask, dtype, ulps=2):
  """Within `ulps` eps(dtype) of max|oracle| (plus 1e-5), for each result."""
  expected = oracle.attention(q, k, v, dout, dlse, scale=q.shape[-1] ** -0.5, mask=mask)
  out, lse, dq, dk, dv = expected
  seen = np.isfinite(lse)
  expected = dict(out=out, lse=np.where(seen, lse, 0.0), seen=seen, dq=dq, dk=dk, dv=dv)
  for name, want in expected.items():
    got = np.asarray(actual[name], np.float64)
    error = np.abs(got - want).max(initial=0.0)
    bound = ulps * float(jnp.finfo(dtype).eps) * np.abs(want).max(initial=0.0) + 1e-5
    assert error <= bound, f"{name}: |sharded - oracle| = {error:.3g} > {bound:.3g}"


MASKS = {
  "full": (False, (-1, -1)),
  "causal": (True, (-1, -1)),
  "causal-window": (True, (5, -1)),
  "band": (False, (3, 5)),
}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("size", [2, 4])
def test_packed_ring(size, mask, normal, compare, make_mesh):
  """GQA, documents across and inside chunks, padding: the sequence runs as a ring (no
  q/k/v gathered) and equals the unsharded call and the oracle, lse and its gradient too."""
  causal, window = MASKS[mask]
  mesh = make_mesh((size,), ("seq",))
  arrays = inputs(normal, 32)
  ids = packed_ids(32, size)
  attention = functools.partial(
    jax_fa3.flash_attention, causal=causal, window_size=window, return_lse=True, **RING
  )
  run = forward_and_vjp_with_lse(lambda q, k, v, ids: attention(q, k, v, segment_ids=ids))
  actual, hlo = compare(run, arrays + [ids], [SEQ] * 4 + [P(None, None, "seq"), SEQ], mesh)
  assert_packed_ring(hlo)
  assert actual["out"].sharding.spec[1] == "seq"
  full_window = (window[0], 0) if causal else window
  assert_matches_oracle(actual, *arrays, dense_mask(ids, ids, full_window), jnp.float16)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("size", [2, 4])
def test_packed_all_gather(size, mask, normal, compare, make_mesh):
  """As test_packed_ring, with the default strategy for packed sequences: K/V and their rows
  gathered, one call a device, no q/k/v exchanged otherwise."""
  causal, window = MASKS[mask]
  mesh = make_mesh((size,), ("seq",))
  arrays = inputs(normal, 32)
  ids = packed_ids(32, size)
  attention = functools.partial(
    jax_fa3.flash_attention, causal=causal, window_size=window, return_lse=True
  )
  run = forward_and_vjp_with_lse(lambda q, k, v, ids: attention(q, k, v, segment_ids=ids))
  actual, hlo = compare(run, arrays + [ids], [SEQ] * 4 + [P(None, None, "seq"), SEQ], mesh)
  assert_all_gather(hlo, kv_heads=2)
  assert actual["out"].sharding.spec[1] == "seq"
  full_window = (window[0], 0) if causal else window
  assert_matches_oracle(actual, *arrays, dense_mask(ids, ids, full_window), jnp.float16)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_packed_with_recurring_ids(strategy, normal, compare, make_mesh):
  """Ids that recur non-contiguously (the rows' id comparison) across the chunks."""
  mesh = make_mesh((4,), ("seq",))
  arrays = inputs(normal, 32, dtype=jnp.bfloat16)
  ids = packed_ids(32, 4)
  ids[:, ::5] = 1
  run = forward_and_vjp_with_lse(
    functools.partial(
      lambda q, k, v, ids: jax_fa3.flash_attention(
        q, k, v, segment_ids=ids, causal=True, return_lse=True, context_parallel=strategy
      )
    )
  )
  actual, hlo = compare(run, arrays + [ids], [SEQ] * 4 + [P(None, None, "seq"), SEQ], mesh)
  if strategy == "ring":
    assert_packed_ring(hlo)
  else:
    assert_all_gather(hlo, kv_heads=2)
  assert_matches_oracle(actual, *arrays, dense_mask(ids, ids, (-1, 0)), jnp.bfloat16)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_packed_cross_attention_of_different_lengths(strategy, normal, compare, make_mesh):
  """16 queries and 48 keys with their own ids, causal (bottom-right): chunks of 4 queries
  and 12 keys, which the rows' positions place."""
  mesh = make_mesh((4,), ("seq",))
  arrays = inputs(normal, 16, 48)
  kv_ids = packed_ids(48, 4)
  q_ids = kv_ids[:, 32:]
  run = forward_and_vjp_with_lse(
    lambda q, k, v, q_ids, kv_ids: jax_fa3.flash_attention(
      q,
      k,
      v,
      segment_ids=q_ids,
      kv_segment_ids=kv_ids,
      causal=True,
      return_lse=True,
      context_parallel=strategy,
    )
  )
  actual, hlo = compare(
    run, arrays + [q_ids, kv_ids], [SEQ] * 4 + [P(None, None, "seq")] + [SEQ] * 2, mesh
  )
  if strategy == "ring":
    assert_packed_ring(hlo)
  else:
    assert_all_gather(hlo, kv_heads=2)
  assert_matches_oracle(actual, *arrays, dense_mask(q_ids, kv_ids, (-1, 0)), jnp.float16)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_packed_batch_sequence_and_heads_together(strategy, explicit, normal, compare, make_mesh):
  mesh = make_mesh((2, 2, 2), ("data", "seq", "model"), explicit)
  spec = P("data", "seq", "model")
  arrays = inputs(normal, 32, heads=8, kv_heads=4)
  ids = packed_ids(32, 2)
  run = forward_and_vjp_with_lse(
    lambda q, k, v, ids: jax_fa3.flash_attention(
      q, k, v, segment_ids=ids, causal=True, return_lse=True, context_parallel=strategy
    )
  )
  actual, hlo = compare(
    run, arrays + [ids], [spec] * 4 + [P("data", "model", "seq"), P("data", "seq")], mesh
  )
  if strategy == "ring":
    assert_packed_ring(hlo)
  else:
    assert_all_gather(hlo, kv_heads=2)
  assert_matches_oracle(actual, *arrays, dense_mask(ids, ids, (-1, 0)), jnp.float16)


@pytest.mark.parametrize(
  "explicit, causal, window",
  [(False, True, (-1, -1)), (True, False, (-1, 3))],
  ids=["auto-causal", "explicit-right-window"],
)
def test_packed_striped_ring(explicit, causal, window, normal, compare, make_mesh, monkeypatch):
  """The striped layout, which choose_split leaves off for packed sequences (see
  sharding._PACKED_STRIPED): the rows are restriped with q, k and v, and each block's
  spans are the positions of its stripes."""
  monkeypatch.setattr(sharding, "_PACKED_STRIPED", True)
  mesh = make_mesh((4,), ("seq",), explicit)
  arrays = inputs(normal, 32)
  ids = packed_ids(32, 4)
  run = forward_and_vjp_with_lse(
    lambda q, k, v, ids: jax_fa3.flash_attention(
      q, k, v, segment_ids=ids, causal=causal, window_size=window, return_lse=True, **RING
    )
  )
  actual, hlo = compare(run, arrays + [ids], [SEQ] * 4 + [P(None, None, "seq"), SEQ], mesh)
  assert_packed_ring(hlo, striped=True)
  full_window = (window[0], 0) if causal else window
  assert_matches_oracle(actual, *arrays, dense_mask(ids, ids, full_window), jnp.float16)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_varlen_split(strategy, normal, compare, make_mesh):
  """flash_attention_varlen with its token axis split: the sequences' own diagonals
  (bottom-right per sequence, Tq != Tk) are in the rows, which the ring cuts per block
  (all-gather: the gathered keys' rows, to the device's queries)."""
  mesh = make_mesh((4,), ("seq",))
  cu_q = np.array([0, 5, 5, 14, 27, 30], np.int32)
  cu_k = np.array([0, 9, 13, 20, 35, 44], np.int32)
  q, dout = normal((32, 4, 16), jnp.float16), normal((32, 4, 16), jnp.float16)
  k, v = normal((48, 2, 16), jnp.float16), normal((48, 2, 16), jnp.float16)

  def run(q, k, v, dout):
    attention = functools.partial(
      jax_fa3.flash_attention_varlen,
      cu_seqlens_q=cu_q,
      cu_seqlens_k=cu_k,
      causal=True,
      context_parallel=strategy,
    )
    out, pullback = jax.vjp(attention, q, k, v)
    return dict(zip(("out", "dq", "dk", "dv"), (out, *pullback(dout))))

  tokens = P("seq")
  actual, hlo = compare(run, [q, k, v, dout], [tokens] * 4, mesh)
  if strategy == "ring":
    assert_packed_ring(hlo)
  else:
    # The token axis is a batch of one: each gathered array is [1, tokens, 2, 16].
    assert_all_gather(hlo, kv_heads=2)
  assert actual["out"].sharding.spec[0] == "seq"


def test_packed_kernel_path_skips_blocks_at_run_time(normal, make_mesh, monkeypatch):
  """Lowered for CUDA (with a faked kernel table): one FFI call a ring step, forward and
  backward, each with its tile plans and behind a run-time test (a conditional)."""
  variants = tuple(Variant(d, "bfloat16", "bfloat16", 16, 16) for d in ("fwd", "bwd"))
  tiles = {("fwd", "bfloat16", 16): (128, 128), ("bwd", "bfloat16", 16): (64, 128)}
  monkeypatch.setattr(_kernels, "_status", KernelStatus(variants, segment_tiles=tiles))
  mesh = make_mesh((4,), ("seq",), explicit=True)
  arrays = [
    jax.device_put(x, NamedSharding(mesh, SEQ)) for x in inputs(normal, 32, dtype=jnp.bfloat16)[:4]
  ]
  ids = jax.device_put(packed_ids(32, 4), NamedSharding(mesh, SEQ))

  def run(q, k, v, dout, ids):
    out, pullback = jax.vjp(
      lambda q, k, v: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True, **RING),
      q,
      k,
      v,
    )
    return out, pullback(dout)

  text = jax.jit(run).trace(*arrays, ids).lower(lowering_platforms=("cuda",)).as_text()
  # sinks (and the forward's FP8 descales) absent: [0]
  for target, operands in (("jax_fa3_fwd", 12), ("jax_fa3_bwd", 13)):
    calls = re.findall(rf"stablehlo.custom_call @{target}\(([^)]*)\)", text)
    assert len(calls) == 4, target
    assert all(len(c.split(",")) == operands for c in calls), calls
  assert text.count("stablehlo.case") == 2 * 3  # every step but the first, forward and backward
  assert "stablehlo.collective_permute" in text
