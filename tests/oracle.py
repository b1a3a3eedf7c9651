"""Attention in float64 NumPy, written from the definitions: the tests' oracle.

It shares no code with jax_fa3. Query row `i` of batch `b` sees key `j` iff
`i < seqused_q[b]`, `j < seqused_k[b]`, and, with `c = i + diagonal_offset`,
`c - window_left <= j <= c + window_right` (a negative bound is unbounded).
A row that sees no key has output 0, lse -inf and no gradient.
"""

import numpy as np


def attention(q, k, v, dout, dlse=None, *, scale, softcap=0.0, window=(-1, -1),
              diagonal_offset=0, seqused_q=None, seqused_k=None):
  """Returns (out, lse, dq, dk, dv) for cotangents `dout` [B,Sq,H,Dv] and `dlse` [B,H,Sq]."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  batch, seqlen_q, heads, _ = q.shape
  seqlen_k, kv_heads = k.shape[1:3]
  group = heads // kv_heads
  out = np.zeros(q.shape[:3] + v.shape[3:])
  lse = np.full((batch, heads, seqlen_q), -np.inf)
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  for b in range(batch):
    visible = _visible(seqlen_q, seqlen_k, window, diagonal_offset,
                       seqlen_q if seqused_q is None else seqused_q[b],
                       seqlen_k if seqused_k is None else seqused_k[b])
    seen = visible.any(axis=1)
    for h in range(heads):
      kh = h // group
      raw = scale * q[b, :, h] @ k[b, :, kh].T
      scores = softcap * np.tanh(raw / softcap) if softcap else raw
      scores = np.where(visible, scores, -np.inf)
      row_max = np.where(seen, scores.max(axis=1, initial=-np.inf), 0.0)
      weights = np.where(visible, np.exp(scores - row_max[:, None]), 0.0)
      total = weights.sum(axis=1)
      probs = weights / np.where(seen, total, 1.0)[:, None]
      lse[b, h] = np.where(seen, row_max + np.log(np.where(seen, total, 1.0)), -np.inf)
      out[b, :, h] = probs @ v[b, :, kh]

      # Backward: dscores = P * (dP - rowsum(P * dP) + dlse).
      dprobs = dout[b, :, h] @ v[b, :, kh].T
      row_dlse = 0.0 if dlse is None else np.asarray(dlse, np.float64)[b, h][:, None]
      dscores = probs * (dprobs - (probs * dprobs).sum(axis=1, keepdims=True) + row_dlse)
      if softcap:
        dscores = dscores * (1.0 - np.tanh(raw / softcap) ** 2)
      dv[b, :, kh] += probs.T @ dout[b, :, h]
      dq[b, :, h] = scale * dscores @ k[b, :, kh]
      dk[b, :, kh] += scale * dscores.T @ q[b, :, h]
  return out, lse, dq, dk, dv


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


def kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, page_table=None, *,
            scale, softcap=0.0, window=(-1, -1)):
  """KV-cache decode from its definition: returns (out, lse, k_cache, v_cache) in float64.

  Position p of sequence b lives at k_cache[b, p] (contiguous) or at
  k_cache[page_table[b, p // page_size], p % page_size] (paged). k_new/v_new go to positions
  [len, len + seqlen_new); q's rows are the last seqlen_q of the len + seqlen_new keys
  (bottom-right alignment). A length out of [0, capacity - seqlen_new] writes nothing and
  gives NaN; a page entry out of range among the used positions gives NaN, and only new
  rows on valid pages are written.
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
    if total == 0:  # no key at all: every row sees nothing
      out[b], lse[b] = 0.0, -np.inf
      continue
    o, l, *_ = attention(q[b:b + 1], keys[None], values[None], np.zeros(q[b:b + 1].shape),
                         scale=scale, softcap=softcap, window=window,
                         diagonal_offset=total - seqlen_q)
    out[b], lse[b] = o[0], l[0]
  return out, lse, k_cache, v_cache
