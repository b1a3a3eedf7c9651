"""Pure-JAX attention in float32: the path off the GPU and the kernels' specification.

Both functions implement exactly the semantics of the FFI contract
(`cuda/ffi/CONTRACT.md`): query row `i` of batch `b` sees key `j` iff
`i < seqused_q[b]`, `j < seqused_k[b]`, `j` lies in the window
`[i + diagonal_offset - window_left, i + diagonal_offset + window_right]`
(a negative bound is unbounded). For packed sequences the rows `q_rows`/`kv_rows`
(`segments.py`) replace that rule: they hold the window and lengths already. A row
that sees no key has output 0 and lse -inf, and contributes nothing to any
gradient. Absent `seqused_*` and rows have shape `[0]`.

Heads are grouped as in `jax.nn.dot_product_attention`: query head `h` reads
key/value head `h // (heads // kv_heads)`.

float8_e4m3fn inputs follow the FP8 kernels' numerics (CONTRACT.md): the e4m3 values are
used exactly, the scores are multiplied by the descale factors, the unnormalised
probabilities exp(s - m) * 256 (exp2 with the +8 offset in the kernels, m the row max) are
rounded to e4m3 before they multiply v, the row sum is taken from the unrounded ones, and
the output is multiplied by descale_v.
"""

import jax
import jax.numpy as jnp

from jax_fa3 import segments

_HIGHEST = jax.lax.Precision.HIGHEST


# The FP8 kernels' unnormalised probabilities are exp2(x - m + 8), in (0, 256]: the +8
# keeps them clear of e4m3's subnormals.
_FP8_PROBS_SCALE = 256.0


def attention_fwd(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  descale_q=None,
  descale_k=None,
  descale_v=None,
  *,
  softmax_scale,
  softcap,
  window_left,
  window_right,
  diagonal_offset,
  return_max_logit=False,
  fp8=None,
):
  """Returns `(out [B, Sq, H, Dv], lse [B, H, Sq] float32)`, out in q's dtype (with `fp8`,
  a primitives.Fp8Params: its out_dtype), and with `return_max_logit` the largest visible
  scaled score of each (batch, head), float32 [B, H] (-inf where none). `sinks` (float32
  [B, H] or absent, shape [0]) adds one logit per row to the softmax's sum, with no value:
  a row within seqused_q that sees no key then has output 0 and lse = its sink. The
  descales (float8_e4m3fn inputs; absent: None or shape [0], factor 1) are float32
  `[B, H, QB]`, `[B, Hk, KB]` and `[B, Hk]`, a block covering fp8.q_block_rows query rows
  or fp8.k_block_rows keys."""
  visible = _visible(
    q.shape[1],
    k.shape[1],
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    window_left,
    window_right,
    diagonal_offset,
  )
  if fp8 is None:
    scores, _ = _scores(q, k, softmax_scale, softcap)
  else:
    scores = _fp8_scores(q, k, descale_q, descale_k, softmax_scale, softcap, fp8)
  scores = jnp.where(visible, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  max_logit = jnp.max(row_max, axis=(3, 4)).reshape(q.shape[0], q.shape[2])
  row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)
  probs = jnp.exp(scores - row_max)
  row_sum = jnp.sum(probs, axis=-1, keepdims=True)
  seen_any = row_sum > 0
  lse = jnp.where(seen_any, row_max + jnp.log(jnp.where(seen_any, row_sum, 1.0)), -jnp.inf)
  if fp8 is None:
    probs = probs / jnp.where(seen_any, row_sum, 1.0)
    out = _ungroup(
      jnp.einsum("bhgqk,bkhd->bhgqd", probs, v.astype(jnp.float32), precision=_HIGHEST)
    )
  else:
    out = _fp8_probs_times_values(probs, row_sum, seen_any, v, descale_v)
  batch, seqlen_q, heads = q.shape[:3]
  lse = lse.reshape(batch, heads, seqlen_q)
  if sinks.size:
    rows = None
    if seqused_q.size:  # rows past the used length are not rows: no sink there
      rows = (jnp.arange(seqlen_q) < seqused_q[:, None])[:, None]
    out, lse = with_sinks(out, lse, sinks, rows)
  results = (out.astype(q.dtype if fp8 is None else fp8.out_dtype), lse)
  return (*results, max_logit) if return_max_logit else results


def _fp8_scores(q, k, descale_q, descale_k, softmax_scale, softcap, fp8):
  """Scores `[B, Hk, G, Sq, Sk]` in float32 from exact e4m3 products, times the descales of
  each query's and key's block and the softmax scale, then softcapped."""
  batch, seqlen_q, heads, _ = q.shape
  seqlen_k, kv_heads = k.shape[1:3]
  q_g = _group(jnp.swapaxes(q, 1, 2).astype(jnp.float32), k)
  scores = jnp.einsum("bhgqd,bkhd->bhgqk", q_g, k.astype(jnp.float32), precision=_HIGHEST)
  factor = jnp.float32(softmax_scale)
  if _present(descale_q):  # [B, H, QB] -> per query row, [B, Hk, G, Sq, 1]
    rows = _per_row(descale_q, fp8.q_block_rows, seqlen_q)
    factor = factor * rows.reshape(batch, kv_heads, heads // kv_heads, seqlen_q, 1)
  if _present(descale_k):  # [B, Hk, KB] -> per key, [B, Hk, 1, 1, Sk]
    keys = _per_row(descale_k, fp8.k_block_rows, seqlen_k)
    factor = factor * keys[:, :, None, None, :]
  scores = scores * factor
  return softcap * jnp.tanh(scores / softcap) if softcap else scores


def _fp8_probs_times_values(probs, row_sum, seen_any, v, descale_v):
  """(P8 . v8) * descale_v / row_sum as `[B, Sq, H, Dv]` float32: P = probs * 256 rounded to
  e4m3 (nearest even; 256 and below never saturate), row_sum the unrounded probs' sum."""
  weights = (probs * _FP8_PROBS_SCALE).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  out = jnp.einsum("bhgqk,bkhd->bhgqd", weights, v.astype(jnp.float32), precision=_HIGHEST)
  scale = 1.0 / (_FP8_PROBS_SCALE * jnp.where(seen_any, row_sum, 1.0))
  if _present(descale_v):  # [B, Hk] -> [B, Hk, 1, 1, 1]
    scale = scale * descale_v[:, :, None, None, None]
  return _ungroup(out * scale)


def _present(operand):
  return operand is not None and operand.size > 0


def _per_row(descale, block_rows, seqlen):
  """`[B, H, blocks]` -> `[B, H, seqlen]`: the factor of each row's block (one block: all)."""
  if descale.shape[2] == 1:
    return jnp.broadcast_to(descale, (*descale.shape[:2], seqlen))
  return jnp.repeat(descale, block_rows, axis=2)[:, :, :seqlen]


def with_sinks(out, lse, sinks, rows=None):
  """Attention over the keys, (out [B, Sq, H, D], lse [B, H, Sq]), turned into attention
  over the keys and the sinks (broadcastable to [B, H]): the sink joins each row's softmax
  sum, which rescales the row's output by exp(lse - lse_with_sink). `rows` (broadcastable
  to [B, H, Sq], or None for all) marks the real rows; the others keep lse -inf. NaN stays
  NaN. Returns out in its own dtype (computed in float32) and the new lse."""
  with_sink = jnp.logaddexp(lse, sinks[..., None])
  if rows is not None:
    with_sink = jnp.where(rows, with_sink, -jnp.inf)
  finite = jnp.where(with_sink == -jnp.inf, 0.0, with_sink)
  weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - finite))
  scaled = out.astype(jnp.float32) * jnp.swapaxes(weight, 1, 2)[..., None]
  return scaled.astype(out.dtype), with_sink


def attention_bwd(
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  *,
  softmax_scale,
  softcap,
  window_left,
  window_right,
  diagonal_offset,
  deterministic,
):
  """Returns `(dq, dk, dv)`, recomputing the probabilities from `lse`, and with sinks their
  gradient `dsinks [B, H]` float32: -sum_i exp(sink - lse_i) rowsum(dout_i * out_i)."""
  del deterministic  # This path is always deterministic.
  visible = _visible(
    q.shape[1],
    k.shape[1],
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    window_left,
    window_right,
    diagonal_offset,
  )
  scores, tanh = _scores(q, k, softmax_scale, softcap)
  probs = jnp.where(visible, jnp.exp(scores - _group(lse[..., None], k)), 0.0)

  dout_g = _group(jnp.swapaxes(dout, 1, 2).astype(jnp.float32), k)
  dv = jnp.einsum("bhgqk,bhgqd->bkhd", probs, dout_g, precision=_HIGHEST)
  dprobs = jnp.einsum("bhgqd,bkhd->bhgqk", dout_g, v.astype(jnp.float32), precision=_HIGHEST)
  # rowsum(dP * P) = rowsum(dO * O): the softmax Jacobian's diagonal term.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dscores = probs * (dprobs - _group(jnp.swapaxes(delta, 1, 2)[..., None], k))
  if softcap:
    dscores = dscores * (1.0 - tanh * tanh)
  dscores = dscores * softmax_scale
  dq = _ungroup(jnp.einsum("bhgqk,bkhd->bhgqd", dscores, k.astype(jnp.float32), precision=_HIGHEST))
  q_g = _group(jnp.swapaxes(q, 1, 2).astype(jnp.float32), k)
  dk = jnp.einsum("bhgqk,bhgqd->bkhd", dscores, q_g, precision=_HIGHEST)
  grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
  if not sinks.size:
    return grads
  return (*grads, sink_gradient(sinks, lse, jnp.swapaxes(delta, 1, 2)))


def sink_gradient(sinks, lse, delta):
  """d loss / d sinks [B, H] from the rows' lse and rowsum(dout * out), both [B, H, Sq]:
  the sink's probability in each row is exp(sink - lse), and d out_i / d sink = -that * out_i.
  Rows with lse = -inf (not rows) contribute nothing."""
  weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(sinks[..., None] - lse))
  return -jnp.sum(weight * delta, axis=-1)


def _scores(q, k, softmax_scale, softcap):
  """Scores `[B, Hk, G, Sq, Sk]` in float32, and tanh(raw/softcap) when capped."""
  q_g = _group(jnp.swapaxes(q, 1, 2).astype(jnp.float32), k)
  scores = (
    jnp.einsum("bhgqd,bkhd->bhgqk", q_g, k.astype(jnp.float32), precision=_HIGHEST) * softmax_scale
  )
  if not softcap:
    return scores, None
  tanh = jnp.tanh(scores / softcap)
  return softcap * tanh, tanh


def _visible(
  seqlen_q,
  seqlen_k,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  window_left,
  window_right,
  diagonal_offset,
):
  """Which key each query row sees: bool, broadcastable to `[B, Hk, G, Sq, Sk]`."""
  if q_rows.size:
    return segments.visible(q_rows, kv_rows)[:, None, None]
  row = jnp.arange(seqlen_q)[:, None]
  col = jnp.arange(seqlen_k)[None, :]
  diagonal = row + diagonal_offset
  visible = jnp.ones((1, seqlen_q, seqlen_k), bool)
  if window_left >= 0:
    visible &= col >= diagonal - window_left
  if window_right >= 0:
    visible &= col <= diagonal + window_right
  if seqused_q.size:
    visible &= row < seqused_q[:, None, None]
  if seqused_k.size:
    visible &= col < seqused_k[:, None, None]
  return visible[:, None, None]


def _group(x_bhs, k):
  """`[B, H, Sq, ...]` -> `[B, Hk, G, Sq, ...]`, with Hk the kv heads of `k`."""
  kv_heads = k.shape[2]
  return x_bhs.reshape(x_bhs.shape[0], kv_heads, x_bhs.shape[1] // kv_heads, *x_bhs.shape[2:])


def _ungroup(x):
  """`[B, Hk, G, Sq, D]` -> `[B, Sq, H, D]`."""
  batch, kv_heads, groups, seqlen, dim = x.shape
  return jnp.swapaxes(x.reshape(batch, kv_heads * groups, seqlen, dim), 1, 2)


def kvcache_attention(
  q,
  k_cache,
  v_cache,
  cache_seqlens,
  k_new,
  v_new,
  page_table,
  *,
  softmax_scale,
  softcap,
  window_left,
  window_right,
  num_splits=0,
):
  """Decode against a KV cache: `(out, lse, k_cache, v_cache)`, as `jax_fa3_decode` does.

  The semantics of CONTRACT.md's `jax_fa3_decode`: `k_new`/`v_new` (absent: shape [0]) are
  written at positions `[cache_seqlens[b], cache_seqlens[b] + seqlen_new)` of the cache
  (contiguous `[batch, max_seqlen, ...]`, or paged `[num_pages, page_size, ...]` through
  `page_table [batch, max_pages]`), then q's rows, the last seqlen_q positions, attend to
  every key before that end under the window (bottom-right aligned). A sequence whose length
  is out of range (negative, or past the capacity with the new keys) writes nothing and gets
  NaN; one whose page-table entries covering those positions are out of range gets NaN, and
  only the new rows on valid pages are written.
  """
  del num_splits  # how the GPU divides the keys; one pass here
  batch, seqlen_q, heads, _ = q.shape
  _, page_size, kv_heads, head_dim = k_cache.shape
  num_rows = k_cache.shape[0] * page_size
  paged = page_table.size > 0
  max_pages = page_table.shape[1] if paged else 1
  capacity = max_pages * page_size
  seqlen_new = k_new.shape[1] if k_new.ndim == 4 else 0

  length_ok = (cache_seqlens >= 0) & (cache_seqlens <= capacity - seqlen_new)
  cache_len = jnp.where(length_ok, cache_seqlens, 0)
  total = cache_len + seqlen_new
  # The cache row of every logical position, and whether its page is in range: [B, capacity].
  positions = jnp.arange(capacity, dtype=jnp.int32)
  if paged:
    pages = page_table[:, positions // page_size]
    page_ok = (pages >= 0) & (pages < k_cache.shape[0])
    rows = jnp.clip(pages, 0, k_cache.shape[0] - 1) * page_size + positions % page_size
  else:
    page_ok = jnp.ones((batch, capacity), bool)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None] * page_size + positions

  k_rows = k_cache.reshape(num_rows, kv_heads, head_dim)
  v_rows = v_cache.reshape(num_rows, kv_heads, head_dim)
  if seqlen_new:
    new_positions = jnp.clip(cache_len[:, None] + jnp.arange(seqlen_new), 0, capacity - 1)
    writable = length_ok[:, None] & jnp.take_along_axis(page_ok, new_positions, axis=1)
    targets = jnp.where(writable, jnp.take_along_axis(rows, new_positions, axis=1), num_rows)
    k_rows = k_rows.at[targets.reshape(-1)].set(k_new.reshape(-1, kv_heads, head_dim), mode="drop")
    v_rows = v_rows.at[targets.reshape(-1)].set(v_new.reshape(-1, kv_heads, head_dim), mode="drop")

  used = positions[None] < total[:, None]
  bad = ~length_ok | jnp.any(used & ~page_ok, axis=1)
  keys, values = k_rows[rows], v_rows[rows]  # [B, capacity, Hk, D], by logical position
  query_positions = total[:, None] - seqlen_q + jnp.arange(seqlen_q)  # [B, Sq]
  col = positions[None, None, :]
  visible = used[:, None, :]
  if window_left >= 0:
    visible &= col >= query_positions[..., None] - window_left
  if window_right >= 0:
    visible &= col <= query_positions[..., None] + window_right
  scores, _ = _scores(q, keys, softmax_scale, softcap)  # [B, Hk, G, Sq, capacity]
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(row_max == -jnp.inf, 0.0, row_max))
  row_sum = jnp.sum(probs, axis=-1, keepdims=True)
  seen_any = row_sum > 0
  probs = probs / jnp.where(seen_any, row_sum, 1.0)
  lse = jnp.where(seen_any, row_max + jnp.log(jnp.where(seen_any, row_sum, 1.0)), -jnp.inf)
  out = _ungroup(
    jnp.einsum("bhgqk,bkhd->bhgqd", probs, values.astype(jnp.float32), precision=_HIGHEST)
  )
  out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(q.dtype)
  lse = jnp.where(bad[:, None, None], jnp.nan, lse.reshape(batch, heads, seqlen_q))
  return (out, lse, k_rows.reshape(k_cache.shape), v_rows.reshape(v_cache.shape))
