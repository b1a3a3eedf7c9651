"""Attention in float64 NumPy, written from the definitions: the tests' oracle.

It shares no code with jax_fa3. Query row `i` of batch `b` sees key `j` iff
`i < seqused_q[b]`, `j < seqused_k[b]`, and, with `c = i + diagonal_offset`,
`c - window_left <= j <= c + window_right` (a negative bound is unbounded).
A row that sees no key has output 0, lse -inf and no gradient. A dense `mask`
`[B, Sq, Sk]` (packed sequences) replaces that rule.
"""

import ml_dtypes
import numpy as np


def attention(
  q,
  k,
  v,
  dout,
  dlse=None,
  *,
  scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  seqused_q=None,
  seqused_k=None,
  mask=None,
):
  """Returns (out, lse, dq, dk, dv) for cotangents `dout` [B,Sq,H,Dv] and `dlse` [B,H,Sq]."""
  return attention_with_sinks(
    q,
    k,
    v,
    dout,
    dlse,
    scale=scale,
    softcap=softcap,
    window=window,
    diagonal_offset=diagonal_offset,
    seqused_q=seqused_q,
    seqused_k=seqused_k,
    mask=mask,
  )[:5]


def attention_with_sinks(
  q,
  k,
  v,
  dout,
  dlse=None,
  *,
  sinks=None,
  scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  seqused_q=None,
  seqused_k=None,
  mask=None,
):
  """Returns (out, lse, dq, dk, dv, dsinks [H], max_logit [B, H]).

  `sinks` [H] (or None) is one more logit per row with no value: it joins the softmax's
  sum. A used row that sees no key then has lse = its sink; rows past seqused_q keep -inf.
  max_logit is the largest visible score of each (batch, head), -inf if none.
  """
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  batch, seqlen_q, heads, _ = q.shape
  seqlen_k, kv_heads = k.shape[1:3]
  group = heads // kv_heads
  out = np.zeros(q.shape[:3] + v.shape[3:])
  lse = np.full((batch, heads, seqlen_q), -np.inf)
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  dsinks = np.zeros(heads)
  max_logit = np.full((batch, heads), -np.inf)
  for b in range(batch):
    used_q = seqlen_q if seqused_q is None else seqused_q[b]
    visible = (
      np.asarray(mask[b], bool)
      if mask is not None
      else _visible(
        seqlen_q,
        seqlen_k,
        window,
        diagonal_offset,
        used_q,
        seqlen_k if seqused_k is None else seqused_k[b],
      )
    )
    seen = visible.any(axis=1)
    for h in range(heads):
      kh = h // group
      raw = scale * q[b, :, h] @ k[b, :, kh].T
      scores = softcap * np.tanh(raw / softcap) if softcap else raw
      scores = np.where(visible, scores, -np.inf)
      max_logit[b, h] = scores.max(initial=-np.inf)
      row_max = scores.max(axis=1, initial=-np.inf)
      sink = -np.inf if sinks is None else float(sinks[h])
      top = np.maximum(row_max, sink)
      has_mass = np.isfinite(top)
      top = np.where(has_mass, top, 0.0)
      weights = np.where(visible, np.exp(scores - top[:, None]), 0.0)
      sink_weight = np.exp(sink - top)
      total = weights.sum(axis=1) + sink_weight
      has_mass &= total > 0
      probs = weights / np.where(has_mass, total, 1.0)[:, None]
      row_lse = np.where(has_mass, top + np.log(np.where(has_mass, total, 1.0)), -np.inf)
      lse[b, h] = np.where(np.arange(seqlen_q) < used_q, row_lse, -np.inf)
      out[b, :, h] = probs @ v[b, :, kh]

      # Backward: dscores = P * (dP - rowsum(P * dP) + dlse), and for the sink, whose
      # probability is p_s = exp(sink - lse): dsink = sum_i p_s,i (dlse_i - rowsum(P * dP)_i).
      dprobs = dout[b, :, h] @ v[b, :, kh].T
      row_dlse = np.zeros(seqlen_q) if dlse is None else np.asarray(dlse, np.float64)[b, h]
      delta = (probs * dprobs).sum(axis=1)
      dscores = probs * (dprobs - delta[:, None] + row_dlse[:, None])
      if sinks is not None:
        sink_prob = np.where(
          np.isfinite(lse[b, h]),
          np.exp(sink - np.where(np.isfinite(lse[b, h]), lse[b, h], 0.0)),
          0.0,
        )
        dsinks[h] += (sink_prob * (row_dlse - delta)).sum()
      if softcap:
        dscores = dscores * (1.0 - np.tanh(raw / softcap) ** 2)
      dv[b, :, kh] += probs.T @ dout[b, :, h]
      dq[b, :, h] = scale * dscores @ k[b, :, kh]
      dk[b, :, kh] += scale * dscores.T @ q[b, :, h]
  return out, lse, dq, dk, dv, dsinks, max_logit


def fp8_attention(
  q8,
  k8,
  v8,
  descale_q,
  descale_k,
  descale_v,
  *,
  scale,
  softcap=0.0,
  window=(-1, -1),
  diagonal_offset=0,
  sinks=None,
  ambiguity=1e-4,
):
  """The FP8 kernels' numerics (CONTRACT.md) in float64, from their definition.

  q8, k8, v8 hold e4m3 values (any dtype); descale_q [B, H, Sq] is each query row's factor,
  descale_k [B, Hk, Sk] each key's, descale_v [B, Hk] each k/v head's. Scores are
  s = (q8 . k8) descale_q descale_k scale (then softcapped); with m the row max, the
  probabilities exp(s - m) * 256 are rounded to e4m3 (nearest even) before they multiply v8,
  and out = (P8 . v8) descale_v / (sum of the unrounded ones, plus exp(sink - m) * 256 with
  `sinks` [H]); lse = m + log(that sum / 256). A row that sees no key gets out 0 and lse
  -inf (its sink with sinks).

  Returns (out [B, Sq, H, Dv], lse [B, H, Sq], slack [B, Sq, H, Dv]). `slack` is what a
  correct implementation in float32 may differ by through the P elements within `ambiguity`
  (relative) of an e4m3 rounding midpoint, which its own rounding errors may send the
  other way: the sum of one e4m3 step times |v8| descale_v / row sum over those elements.
  """
  q8, k8, v8 = (np.asarray(x, np.float64) for x in (q8, k8, v8))
  batch, seqlen_q, heads, _ = q8.shape
  seqlen_k, kv_heads = k8.shape[1:3]
  group = heads // kv_heads
  out = np.zeros(q8.shape[:3] + v8.shape[3:])
  slack = np.zeros_like(out)
  lse = np.full((batch, heads, seqlen_q), -np.inf)
  visible = _visible(seqlen_q, seqlen_k, window, diagonal_offset, seqlen_q, seqlen_k)
  for b in range(batch):
    for h in range(heads):
      kh = h // group
      raw = (q8[b, :, h] @ k8[b, :, kh].T) * scale
      raw = raw * np.asarray(descale_q, np.float64)[b, h][:, None]
      raw = raw * np.asarray(descale_k, np.float64)[b, kh][None, :]
      scores = softcap * np.tanh(raw / softcap) if softcap else raw
      scores = np.where(visible, scores, -np.inf)
      row_max = scores.max(axis=1, initial=-np.inf)
      top = np.where(np.isfinite(row_max), row_max, 0.0)
      probs = np.where(visible, np.exp(scores - top[:, None]), 0.0) * 256.0
      total = probs.sum(axis=1)
      if sinks is not None:
        total = total + np.exp(float(sinks[h]) - top) * 256.0
      has_mass = total > 0
      rounded = probs.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
      steps = _e4m3_step(probs)
      near_midpoint = np.abs(probs / steps - np.floor(probs / steps) - 0.5) * steps
      ambiguous = visible & (near_midpoint <= ambiguity * probs)
      value_scale = float(np.asarray(descale_v, np.float64)[b, kh])
      divisor = np.where(has_mass, total, 1.0)[:, None]
      out[b, :, h] = (rounded @ v8[b, :, kh]) * value_scale / divisor
      slack[b, :, h] = (
        (np.where(ambiguous, steps, 0.0) @ np.abs(v8[b, :, kh])) * value_scale / divisor
      )
      lse[b, h] = np.where(has_mass, top + np.log(np.where(has_mass, total, 1.0) / 256.0), -np.inf)
  return out, lse, slack


def _e4m3_step(x):
  """The spacing of e4m3 values around x >= 0: 2^(e - 3) in binade [2^e, 2^(e+1)), 2^-9 below
  2^-6 (subnormals)."""
  exponent = np.floor(np.log2(np.maximum(x, 2.0**-6)))
  return np.where(x >= 2.0**-6, 2.0 ** (exponent - 3), 2.0**-9)


def _visible(seqlen_q, seqlen_k, window, diagonal_offset, used_q, used_k):
  rows = np.arange(seqlen_q)[:, None]
  cols = np.arange(seqlen_k)[None, :]
  visible = (rows < used_q) & (cols < used_k)
  left, right = window
  if left >= 0:
    visible &= cols >= rows + diagonal_offset - left
  if right >= 0:
    visible &= cols <= rows + diagonal_offset + right
  return visible


def kvcache(
  q,
  k_cache,
  v_cache,
  cache_seqlens,
  k_new=None,
  v_new=None,
  page_table=None,
  *,
  scale,
  softcap=0.0,
  window=(-1, -1),
  sinks=None,
):
  """KV-cache decode from its definition: returns (out, lse, k_cache, v_cache) in float64.

  Position p of sequence b lives at k_cache[b, p] (contiguous) or at
  k_cache[page_table[b, p // page_size], p % page_size] (paged). k_new/v_new go to positions
  [len, len + seqlen_new); q's rows are the last seqlen_q of the len + seqlen_new keys
  (bottom-right alignment). A length out of [0, capacity - seqlen_new] writes nothing and
  gives NaN; a page entry out of range among the used positions gives NaN, and only new
  rows on valid pages are written. `sinks` [heads] join every row's softmax (attention_with_sinks).
  """
  q = np.asarray(q, np.float64)
  k_cache, v_cache = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
  batch, seqlen_q, heads, _ = q.shape
  page_size = k_cache.shape[1]
  seqlen_new = 0 if k_new is None else k_new.shape[1]
  max_pages = 1 if page_table is None else page_table.shape[1]
  out = np.full(q.shape, np.nan)
  lse = np.full((batch, heads, seqlen_q), np.nan)

  def where(b, p):  # (page, row) of position p, or None when its page is out of range
    if page_table is None:
      return b, p
    page = int(page_table[b, p // page_size])
    return (page, p % page_size) if 0 <= page < k_cache.shape[0] else None

  for b in range(batch):
    length = int(cache_seqlens[b])
    if not 0 <= length <= max_pages * page_size - seqlen_new:
      continue
    for r in range(seqlen_new):
      place = where(b, length + r)
      if place is not None:
        k_cache[place] = np.asarray(k_new[b, r], np.float64)
        v_cache[place] = np.asarray(v_new[b, r], np.float64)
    total = length + seqlen_new
    places = [where(b, p) for p in range(total)]
    if any(place is None for place in places):
      continue
    keys = np.stack([k_cache[place] for place in places]) if total else k_cache[:0, 0]
    values = np.stack([v_cache[place] for place in places]) if total else v_cache[:0, 0]
    if total == 0:  # no key at all: every row sees nothing (but its sink)
      out[b], lse[b] = 0.0, -np.inf if sinks is None else np.asarray(sinks, np.float64)[:, None]
      continue
    o, l, *_ = attention_with_sinks(
      q[b : b + 1],
      keys[None],
      values[None],
      np.zeros(q[b : b + 1].shape),
      sinks=sinks,
      scale=scale,
      softcap=softcap,
      window=window,
      diagonal_offset=total - seqlen_q,
    )
    out[b], lse[b] = o[0], l[0]
  return out, lse, k_cache, v_cache


def segment_mask(q_ids, kv_ids, window=(-1, -1), diagonal_offset=0):
  """The dense mask `[B, Sq, Sk]` of packed sequences, from the ids and positions alone:
  same id, not padding (negative), and in the window around `i + diagonal_offset`."""
  q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
  rows = np.arange(q_ids.shape[1])[:, None] + diagonal_offset
  cols = np.arange(kv_ids.shape[1])[None, :]
  mask = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)
  left, right = window
  if left >= 0:
    mask &= (cols >= rows - left)[None]
  if right >= 0:
    mask &= (cols <= rows + right)[None]
  return mask
