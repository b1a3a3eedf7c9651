"""Attention in float64 NumPy, written from the definitions: the tests' oracle.

It shares no code with jax_fa3. Query row `i` of batch `b` sees key `j` iff
`i < seqused_q[b]`, `j < seqused_k[b]`, and, with `c = i + diagonal_offset`,
`c - window_left <= j <= c + window_right` (a negative bound is unbounded).
A row that sees no key has output 0, lse -inf and no gradient. A dense `mask`
`[B, Sq, Sk]` (packed sequences) replaces that rule.
"""

import numpy as np


def attention(q, k, v, dout, dlse=None, *, scale, softcap=0.0, window=(-1, -1),
              diagonal_offset=0, seqused_q=None, seqused_k=None, mask=None):
  """Returns (out, lse, dq, dk, dv) for cotangents `dout` [B,Sq,H,Dv] and `dlse` [B,H,Sq]."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  batch, seqlen_q, heads, _ = q.shape
  seqlen_k, kv_heads = k.shape[1:3]
  group = heads // kv_heads
  out = np.zeros(q.shape[:3] + v.shape[3:])
  lse = np.full((batch, heads, seqlen_q), -np.inf)
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  for b in range(batch):
    visible = np.asarray(mask[b], bool) if mask is not None else _visible(
        seqlen_q, seqlen_k, window, diagonal_offset,
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
