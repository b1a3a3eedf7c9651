"""Packed sequences on any machine: segment ids and varlen through the reference path
against the float64 oracle, the tile plans the kernels rely on against brute force, the
argument checks, and benchmarks/packed.py at a small size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3
import oracle
from documents import random_documents
from jax_fa3 import segments

pytestmark = pytest.mark.usefixtures("on_cpu")


def _dense_mask(q_ids, kv_ids, window, diagonal_offset):
  """[B, Sq, Sk] from the ids and positions alone."""
  return oracle.segment_mask(q_ids, kv_ids, window, diagonal_offset)


def _oracle(q, k, v, mask, scale):
  """Float64 attention with a dense [B, Sq, Sk] mask: (out, lse)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = k.repeat(group, 2), v.repeat(group, 2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(mask[:, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1), v)
  lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1)) + m[..., 0], -np.inf)
  return out, lse


@pytest.mark.parametrize(
  "causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 5)), (True, (6, -1))]
)
@pytest.mark.parametrize("recurring", [False, True])
def test_segment_ids_match_the_oracle(causal, window, recurring, normal):
  rng = np.random.default_rng(int(causal) + 2 * int(recurring) + 4 * (window[0] + 1))
  sq, sk = 45, 45
  ids = np.stack([random_documents(rng, sq, 6, pad=4), random_documents(rng, sq, 9)])
  if recurring:
    ids[:, ::7] = 1
  q, k, v = normal((2, sq, 4, 16)), normal((2, sk, 2, 16)), normal((2, sk, 2, 16))
  out, lse = jax_fa3.flash_attention(
    q, k, v, segment_ids=ids, causal=causal, window_size=window, return_lse=True
  )
  mask = _dense_mask(ids, ids, (window[0], 0) if causal else window, 0)
  ref_out, ref_lse = _oracle(q, k, v, mask, 16**-0.5)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=2e-2)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)  # -inf where no key


def test_kv_segment_ids_for_cross_attention(normal):
  rng = np.random.default_rng(0)
  q_ids = np.sort(rng.integers(-1, 4, (1, 30)), axis=1).astype(np.int32)
  kv_ids = np.sort(rng.integers(0, 5, (1, 50)), axis=1).astype(np.int32)
  q, k, v = normal((1, 30, 2, 8)), normal((1, 50, 2, 8)), normal((1, 50, 2, 8))
  out = jax_fa3.flash_attention(q, k, v, segment_ids=q_ids, kv_segment_ids=kv_ids, causal=True)
  ref_out, _ = _oracle(q, k, v, _dense_mask(q_ids, kv_ids, (-1, 0), 20), 8**-0.5)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=2e-2)


def test_segment_gradients_match_the_oracle(normal):
  rng = np.random.default_rng(1)
  ids = np.stack([random_documents(rng, 33, 5, pad=3)])
  q, k, v = normal((1, 33, 2, 8)), normal((1, 33, 1, 8)), normal((1, 33, 1, 8))
  weights = normal((1, 33, 2, 8)).astype(jnp.float32)
  mask = jnp.asarray(_dense_mask(ids, ids, (-1, 0), 0))[:, None]

  def reference(q, k, v):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, 2)) * 8**-0.5
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(jnp.where(jnp.isfinite(s), s, -1e30), -1, keepdims=True))
    p = jnp.where(mask, p, 0)
    l = jnp.sum(p, -1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1), jnp.repeat(v, 2, 2))

  ours = lambda q, k, v: jnp.sum(
    jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True).astype(jnp.float32) * weights
  )
  theirs = lambda q, k, v: jnp.sum(reference(q, k, v) * weights)
  for g, r in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=3e-2)
  dq = jax.grad(ours)(q, k, v)
  assert np.all(np.asarray(dq, np.float32)[:, -3:] == 0)  # padding rows pass no gradient


def test_varlen_matches_per_sequence_attention(normal):
  lengths_q, lengths_k = [5, 0, 7, 3, 1], [9, 4, 7, 0, 6]
  cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
  cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
  q, k, v = normal((cu_q[-1] + 2, 4, 16)), normal((cu_k[-1], 2, 16)), normal((cu_k[-1], 2, 16))
  for causal in (False, True):
    out, lse = jax_fa3.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for s in range(len(lengths_q)):
      a, b = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
      if not lengths_k[s]:  # key-less: output 0
        assert np.all(np.asarray(out[a], np.float32) == 0)
        continue
      lq, lk = lengths_q[s], lengths_k[s]
      mask = np.ones((1, lq, lk), bool)
      if causal:
        mask &= (np.arange(lk)[None] <= np.arange(lq)[:, None] + lk - lq)[None]
      ref, _ = _oracle(q[None, a], k[None, b], v[None, b], mask, 0.25)
      np.testing.assert_allclose(np.asarray(out[a], np.float64), ref[0], atol=2e-2)
    assert np.all(np.asarray(out[cu_q[-1] :], np.float32) == 0)


def test_varlen_malformed_sequences_are_nan_and_only_those(normal):
  q, k = normal((40, 2, 8)), normal((30, 2, 8))
  out = jax_fa3.flash_attention_varlen(
    q, k, k, np.array([0, 10, 25, 20, 40], np.int32), np.array([0, 10, 20, 25, 90], np.int32)
  )
  nan_rows = np.isnan(np.asarray(out, np.float32)).any(axis=(1, 2))
  assert not nan_rows[:20].any() and nan_rows[20:40].all()


# --- The plans the kernels rely on ------------------------------------------------


def _brute_force_blocks(visible, block_m, block_n):
  """[tiles, blocks]: any visible pair; every row of the tile (within the array) sees
  every key of the block (within the array, and the block is whole)."""
  sq, sk = visible.shape
  tiles, blocks = -(-sq // block_m), -(-sk // block_n)
  any_pair = np.zeros((tiles, blocks), bool)
  whole = np.zeros((tiles, blocks), bool)
  for m in range(tiles):
    for n in range(blocks):
      tile = visible[m * block_m : (m + 1) * block_m, n * block_n : (n + 1) * block_n]
      any_pair[m, n] = tile.any()
      whole[m, n] = tile.all() and (n + 1) * block_n <= sk
  return any_pair, whole


@pytest.mark.parametrize("seed", range(12))
def test_plans_cover_every_visible_pair_and_skip_masks_only_where_whole(seed):
  rng = np.random.default_rng(seed)
  sq = int(rng.integers(1, 300))
  sk = sq if seed % 3 else int(rng.integers(1, 300))
  block_m, block_n = [(64, 64), (128, 176), (192, 128), (128, 80), (64, 128)][seed % 5]
  q_ids = random_documents(
    rng, sq, int(rng.integers(1, 120)), pad=int(rng.integers(0, 10)) if sq > 20 else 0
  )
  kv_ids = q_ids if sk == sq else random_documents(rng, sk, int(rng.integers(1, 120)))
  if seed % 4 == 1:
    q_ids[::5] = q_ids[0]  # recurring ids
  window = [(-1, -1), (-1, 0), (17, 3), (0, -1)][seed % 4]
  offset = sk - sq
  q_rows, kv_rows = segments.rows(
    jnp.asarray(q_ids)[None],
    jnp.asarray(kv_ids)[None],
    window_left=window[0],
    window_right=window[1],
    q_offsets=jnp.full((1, sq), offset, jnp.int32),
    kv_offsets=jnp.full((1, sk), offset, jnp.int32),
  )
  visible = _dense_mask(q_ids[None], kv_ids[None], window, offset)[0]
  np.testing.assert_array_equal(np.asarray(segments.visible(q_rows, kv_rows))[0], visible)
  # The key side's rows describe the same mask, transposed.
  np.testing.assert_array_equal(np.asarray(segments.visible(kv_rows, q_rows))[0], visible.T)

  any_pair, whole = _brute_force_blocks(visible, block_m, block_n)
  plan = np.asarray(segments.forward_plan(q_rows, block_m, block_n))[0]
  for m, (n_min, n_max, right, left) in enumerate(plan):
    visited = np.zeros(any_pair.shape[1], bool)
    visited[n_min:n_max] = True
    assert not (any_pair[m] & ~visited).any(), f"tile {m} misses a visible block: {plan[m]}"
    unmasked = np.zeros_like(visited)
    unmasked[left:right] = True
    assert not (unmasked & ~whole[m]).any(), f"tile {m} runs a partly masked block unmasked"
    assert n_min <= left <= right <= n_max or left == right

  query_tiles, key_blocks = (
    np.asarray(x)[0] for x in segments.backward_plans(q_rows, sk, block_m, block_n)
  )
  np.testing.assert_array_equal(query_tiles, plan)
  for n, (m_begin, m_end) in enumerate(key_blocks):
    visiting = [m for m in range(len(plan)) if plan[m, 0] <= n < plan[m, 1]]
    assert all(m_begin <= m < m_end for m in visiting), (n, key_blocks[n], visiting)


# --- Argument checks ------------------------------------------------------------------


def test_segment_id_errors(normal):
  q, k = normal((2, 10, 2, 8)), normal((2, 12, 2, 8))
  ids_q, ids_k = np.zeros((2, 10), np.int32), np.zeros((2, 12), np.int32)
  with pytest.raises(ValueError, match="kv_segment_ids needs segment_ids"):
    jax_fa3.flash_attention(q, k, k, kv_segment_ids=ids_k)
  with pytest.raises(ValueError, match="kv_segment_ids is needed"):
    jax_fa3.flash_attention(q, k, k, segment_ids=ids_q)
  with pytest.raises(ValueError, match=r"segment_ids must be integers of shape \[batch, seqlen\]"):
    jax_fa3.flash_attention(q, k, k, segment_ids=ids_q[:, :5], kv_segment_ids=ids_k)
  with pytest.raises(ValueError, match="kv_segment_ids must be integers"):
    jax_fa3.flash_attention(q, k, k, segment_ids=ids_q, kv_segment_ids=ids_k.astype(np.float32))


def test_varlen_argument_errors(normal):
  q = normal((10, 2, 8))
  cu = np.array([0, 4, 10], np.int32)
  with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
    jax_fa3.flash_attention_varlen(q, q, q, cu.astype(np.float32), cu)
  with pytest.raises(ValueError, match="cu_seqlens_k must be int32 of shape"):
    jax_fa3.flash_attention_varlen(q, q, q, cu, cu[None])
  with pytest.raises(ValueError, match="same number of sequences"):
    jax_fa3.flash_attention_varlen(q, q, q, cu, cu[:2])
  with pytest.raises(ValueError, match="q must have rank 3"):
    jax_fa3.flash_attention_varlen(q[None], q, q, cu, cu)


# --- The benchmark --------------------------------------------------------------------


def test_packed_benchmark_writes_its_records(tmp_path, monkeypatch):
  """benchmarks/packed.py at a small size (the notebook's section 3 runs the same code):
  issue 13's record schema, the useful FLOPs of the documents measured, and the table."""
  import json
  import pathlib

  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
  import bench
  import packed
  import timing

  for module in (bench, packed, timing):  # the reference path's sizes and timing, GPU or not
    monkeypatch.setattr(module, "on_gpu", lambda: False)
  packed.main(
    [
      "--head-dims",
      "64",
      "--row-lengths",
      "512",
      "--mean-docs",
      "128",
      "--causal",
      "yes",
      "--impls",
      "jax_fa3",
      "jax_fa3_per_document",
      "--iterations",
      "1",
      "--out",
      str(tmp_path),
    ]
  )
  records = json.loads((tmp_path / "packed.json").read_text())
  assert [(r["impl"], r["mode"]) for r in records] == [
    (impl, mode) for mode in packed.MODES for impl in ("jax_fa3", "jax_fa3_per_document")
  ]
  (problem,) = packed.problems(packed.CPU_SIZES, (True,), [64], [512], [128])
  lengths = [n for row in problem.documents() for n in row]
  for r in records:
    assert set(r) == {
      "impl",
      "mode",
      "dtype",
      "head_dim",
      "causal",
      "batch",
      "heads",
      "seqlen_q",
      "seqlen_k",
      "mean_doc_len",
      "documents",
      "ms",
      "useful_tflops",
      "card",
    }
    assert (r["batch"], r["seqlen_q"], r["heads"], r["documents"]) == (2, 512, 2, len(lengths))
    assert r["mean_doc_len"] == np.mean(lengths) and r["ms"] > 0
    assert r["useful_tflops"] == pytest.approx(problem.useful_flops(r["mode"]) / r["ms"] / 1e9)
  # In-document work only, halved when causal; forward+backward 3.5x the forward.
  assert problem.useful_flops("packed_fwd") == 2 * 2 * 64 * sum(n * n for n in lengths)
  assert problem.useful_flops("packed_fwdbwd") == 3.5 * problem.useful_flops("packed_fwd")
  table = (tmp_path / "packed.md").read_text()
  assert "## packed_fwd" in table and "## packed_fwdbwd" in table
  assert f"| 64 | yes | 512 | {np.mean(lengths):.0f} | " in table and "NO GPU" in table
