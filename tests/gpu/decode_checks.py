"""Checks of flash_attention_with_kvcache under transformations (vmap, sharding), shared by
test_decode_transforms.py (one GPU) and test_multi_gpu_decode.py (several): each call's
results against the float64 oracle with test_decode_kernel.py's tolerances, and the inputs
those tests draw.

Imported by name, as kernel_ffi is: pytest puts tests/gpu on sys.path.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import jax_fa3
import oracle
from jax_fa3._kernels import DECODE_TARGET
from test_decode_kernel import _baseline, _inputs


def decode_inputs(
  rng,
  *,
  batch,
  heads,
  kv_heads,
  head_dim=128,
  capacity=512,
  seqlen_q=1,
  seqlen_new=1,
  dtype=jnp.bfloat16,
  page_size=0,
):
  """[q, k_cache, v_cache, lengths, k_new, v_new, page_table] as test_decode_kernel.py draws
  them (pages in random order, some spare; k_new/v_new and page_table None when absent),
  with ragged lengths that leave room for the new tokens: one full cache, one empty."""
  q, k_cache, v_cache, new, table = _inputs(
    rng, batch, seqlen_q, heads, kv_heads, head_dim, capacity, seqlen_new, dtype, page_size
  )
  lengths = rng.integers(0, capacity - seqlen_new + 1, batch).astype(np.int32)
  lengths[0] = capacity - seqlen_new
  lengths[-1] = 0
  return [q, k_cache, v_cache, jnp.asarray(lengths), *new, table]


def decode(q, k_cache, v_cache, lengths, k_new=None, v_new=None, page_table=None, **kwargs):
  """flash_attention_with_kvcache with its lse: (out, lse, k_cache, v_cache)."""
  (out, lse), k_cache, v_cache = jax_fa3.flash_attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    lengths,
    k_new=k_new,
    v_new=v_new,
    page_table=page_table,
    return_lse=True,
    **kwargs,
  )
  return out, lse, k_cache, v_cache


def assert_matches_the_oracle(arrays, results, *, window=(-1, -1), softcap=0.0, causal=True):
  """`results` (out, lse, k_cache, v_cache) of one call on `arrays` (decode_inputs' list, of
  one mapped instance) against oracle.kvcache: the returned caches equal to the entry; a
  sequence with bad input (the oracle's NaN) NaN in out and lse; every other row within
  twice the bfloat16 XLA baseline's error (+ 1e-4) of the oracle, lse within 2e-3, a row
  that sees no key 0 with lse -inf. A row the kernel did not write is NaN (the poisoning of
  tests/gpu/conftest.py) and fails. Returns the sequences with bad input."""
  q, k_cache, v_cache, lengths, k_new, v_new, table = arrays
  out, lse = (np.asarray(x, np.float32) for x in results[:2])
  scale = q.shape[-1] ** -0.5
  window = (window[0], 0) if causal else tuple(window)
  want_out, want_lse, want_k, want_v = oracle.kvcache(
    q, k_cache, v_cache, lengths, k_new, v_new, table, scale=scale, softcap=softcap, window=window
  )
  np.testing.assert_array_equal(np.asarray(results[2], np.float64), want_k)
  np.testing.assert_array_equal(np.asarray(results[3], np.float64), want_v)
  assert out.shape == want_out.shape and lse.shape == want_lse.shape
  bad = np.isnan(want_lse).all(axis=(1, 2))
  assert np.isnan(out[bad]).all() and np.isnan(lse[bad]).all(), "bad input must give NaN"
  # The baseline reads every sequence's pages; a bad sequence's rows are not compared.
  readable = None if table is None else np.clip(np.asarray(table), 0, k_cache.shape[0] - 1)
  seqlen_new = 0 if k_new is None else k_new.shape[1]
  base = _baseline(q, want_k, want_v, readable, lengths, seqlen_new, window, softcap, scale)
  seen = np.isfinite(want_lse)  # [B, H, Sq]: rows of good sequences that see a key
  seen_rows = np.swapaxes(seen, 1, 2)[..., None]
  err = np.max(np.abs(np.where(seen_rows, out - want_out, 0)))
  base_err = np.max(np.abs(np.where(seen_rows, base - want_out, 0)))
  assert err <= 2 * base_err + 1e-4, (err, base_err)
  unseen = ~seen & ~bad[:, None, None]
  assert (out[np.broadcast_to(np.swapaxes(unseen, 1, 2)[..., None], out.shape)] == 0).all()
  assert (lse[unseen] == -np.inf).all()
  np.testing.assert_allclose(lse[seen], want_lse[seen], atol=2e-3, rtol=1e-4)
  return bad


def instance(tree, i, axis):
  """Mapped instance i of `tree` (its arrays mapped on `axis`; None: not mapped)."""
  return jax.tree.map(
    lambda x: x if axis is None or x is None else x[(slice(None),) * axis + (i,)],
    tree,
    is_leaf=lambda x: x is None,
  )


def run_sharded(arrays, specs, mesh, **kwargs):
  """jit(decode) on `arrays` put on `mesh` as `specs` (None for an absent operand):
  (results, compiled HLO text)."""
  placed = [
    None if x is None else jax.device_put(x, NamedSharding(mesh, spec))
    for x, spec in zip(arrays, specs)
  ]
  compiled = jax.jit(lambda *a: decode(*a, **kwargs)).lower(*placed).compile()
  return compiled(*placed), compiled.as_text()


def calls_the_kernel(hlo_text):
  """Whether compiled HLO text calls the decode kernel."""
  return f'custom_call_target="{DECODE_TARGET}"' in hlo_text


def assert_sharded_as(results, mesh, specs):
  """Each result has the sharding of its spec (results and specs in the same order)."""
  for i, (x, spec) in enumerate(zip(results, specs, strict=True)):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (i, x.sharding)
