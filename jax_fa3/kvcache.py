"""KV-cache decode: `flash_attention_with_kvcache`, FlashAttention's inference entry point.

The caches are updated in place by the kernel (its FFI call aliases them), so a caller that
donates them to `jax.jit` pays no copy; without donation XLA copies them first. The path
down is the same as attention.py's: checks here, then the `decode` primitive (primitives.py),
which lowers to `jax_fa3_decode` on Hopper and to `reference.kvcache_attention` elsewhere.
"""

import jax.numpy as jnp
import numpy as np

from jax_fa3 import _checks, attention, primitives, reference, sharding

_NAME = "flash_attention_with_kvcache"


def flash_attention_with_kvcache(
  q,
  k_cache,
  v_cache,
  cache_seqlens,
  *,
  k_new=None,
  v_new=None,
  page_table=None,
  softmax_scale=None,
  causal=True,
  window_size=(-1, -1),
  softcap=0.0,
  sinks=None,
  num_splits=0,
  return_lse=False,
):
  """Attention of new queries to a KV cache, appending new keys and values to it.

  Args:
    q: `[batch, seqlen_q, heads, head_dim]`, bfloat16 or float16; seqlen_q >= 1 (one token
      of decode, several speculative tokens, or a chunk of prefill).
    k_cache, v_cache: the cache, in q's dtype, either contiguous
      `[batch, max_seqlen, kv_heads, head_dim]`, or, with `page_table`, paged
      `[num_pages, page_size, kv_heads, head_dim]`. `heads % kv_heads == 0`; the query heads
      that share a KV head are computed together, so the cache is read once.
    cache_seqlens: int32 `[batch]`, the valid entries of each sequence before the call
      (may be traced).
    k_new, v_new: optional `[batch, seqlen_new, kv_heads, head_dim]`: written to the cache
      at positions `[cache_seqlens, cache_seqlens + seqlen_new)` and attended to.
    page_table: int32 `[batch, max_pages]`: position p of sequence b lives in page
      `page_table[b, p // page_size]`, row `p % page_size`. Any page size works.
    softmax_scale: as in `flash_attention`; defaults to `1 / sqrt(head_dim)`.
    causal, window_size, softcap: as in `flash_attention`: q's rows are the last seqlen_q
      positions of each sequence (`cache_seqlens + seqlen_new` keys), aligned bottom-right.
    sinks: attention sinks, as in `flash_attention`: a float `[heads]` array, one logit per
      query head that joins every row's softmax with no value (a row that sees no key gets
      output 0 and lse `sinks[h]`).
    num_splits: how many parts the keys of each sequence are split into on the GPU
      (flash-decoding), combined in the same call; 0 picks it from the batch, heads, cache
      size, cache layout (paged or not) and SM count. At most 128. Results are the same up
      to float rounding.
    return_lse: also return the float32 log-sum-exp `[batch, heads, seqlen_q]`.

  A sequence whose `cache_seqlens` is negative or leaves no room for k_new, or whose page
  table points outside `[0, num_pages)` for a position it uses, gets NaN output (and lse);
  nothing is read or written out of bounds and no other sequence's cache entries change
  (an out-of-range length writes nothing; a bad page's rows are not written).
  There is no gradient (an inference op).

  Returns:
    `(out, k_cache, v_cache)`, or `((out, lse), k_cache, v_cache)` with `return_lse`:
    `out [batch, seqlen_q, heads, head_dim]` in q's dtype and the updated caches.
  """
  q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
  _check_array("q", q, 4)
  _check_array("k_cache", k_cache, 4, q.dtype)
  _check_array("v_cache", v_cache, 4, q.dtype)
  batch, seqlen_q, heads, head_dim = q.shape
  if v_cache.shape != k_cache.shape:
    raise ValueError(
      f"{_NAME}: v_cache must have k_cache's shape {k_cache.shape}, got {v_cache.shape}"
    )
  kv_heads = k_cache.shape[2]
  if k_cache.shape[3] != head_dim or heads % kv_heads:
    raise ValueError(
      f"{_NAME}: k_cache {k_cache.shape} must have q's head_dim and a number of "
      f"heads that divides q's: q {q.shape}"
    )
  if head_dim > attention._MAX_HEAD_DIM:
    raise ValueError(f"{_NAME}: head_dim must be at most {attention._MAX_HEAD_DIM}, got {head_dim}")
  cache_seqlens = _check_int32("cache_seqlens", cache_seqlens, (batch,), "[batch]")
  if page_table is None:
    if k_cache.shape[0] != batch:
      raise ValueError(
        f"{_NAME}: without page_table, k_cache is [batch, max_seqlen, kv_heads, "
        f"head_dim] with q's batch {batch}, got {k_cache.shape}"
      )
  else:
    page_table = jnp.asarray(page_table)
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.shape[1] < 1:
      raise ValueError(
        f"{_NAME}: page_table must be int32 [batch, max_pages] with batch "
        f"{batch}, got {page_table.dtype}{list(page_table.shape)}"
      )
    page_table = _check_int32("page_table", page_table, page_table.shape, "[batch, max_pages]")
  capacity = k_cache.shape[1] * (1 if page_table is None else page_table.shape[1])
  if capacity > 2**30:
    raise ValueError(f"{_NAME}: a sequence can hold at most 2^30 positions, got {capacity}")
  if (k_new is None) != (v_new is None):
    raise ValueError(f"{_NAME}: pass both k_new and v_new, or neither")
  if k_new is not None:
    k_new, v_new = jnp.asarray(k_new), jnp.asarray(v_new)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
      if (
        x.ndim != 4
        or x.dtype != q.dtype
        or x.shape[0] != batch
        or x.shape[2:] != (kv_heads, head_dim)
      ):
        raise ValueError(
          f"{_NAME}: {name} must be [batch, seqlen_new, kv_heads, head_dim] = "
          f"[{batch}, seqlen_new, {kv_heads}, {head_dim}] in {q.dtype}, got "
          f"{x.dtype}{list(x.shape)}"
        )
    if k_new.shape != v_new.shape:
      raise ValueError(f"{_NAME}: k_new {k_new.shape} and v_new {v_new.shape} must have one shape")
    if k_new.shape[1] == 0:
      k_new = v_new = None
  _checks.refuse_traced("num_splits", num_splits, "it sets the shape of the kernels' workspace")
  if not (attention._is_int(num_splits) and 0 <= num_splits <= primitives.DECODE_MAX_SPLITS):
    raise ValueError(
      f"{_NAME}: num_splits must be an int in [0, {primitives.DECODE_MAX_SPLITS}] "
      f"(0 = automatic), got {num_splits!r}"
    )
  causal, return_lse = attention._check_flags(causal=causal, return_lse=return_lse)
  if sinks is not None:
    sinks = attention._check_sinks(_NAME, sinks, 1, heads)[0]
  params = attention._flash_params(
    head_dim, softmax_scale, causal, window_size, softcap, diagonal_offset=0
  )
  out, lse, k_cache, v_cache = sharding.decode(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *map(primitives.absent_if_none, (k_new, v_new, page_table)),
    softmax_scale=params.softmax_scale,
    softcap=params.softcap,
    window_left=params.window_left,
    window_right=params.window_right,
    num_splits=int(num_splits),
  )
  if sinks is not None:
    # In JAX rather than in the kernel's combine: decode's out is a few rows a sequence, so
    # this is one cheap elementwise pass. A sequence with bad input stays NaN.
    out, lse = reference.with_sinks(out, lse, sinks)
  return ((out, lse) if return_lse else out), k_cache, v_cache


def _check_array(name, x, ndim, dtype=None):
  if x.ndim != ndim:
    raise ValueError(f"{_NAME}: {name} must have rank {ndim}, got shape {x.shape}")
  if x.dtype not in attention.DTYPES:
    raise TypeError(f"{_NAME}: {name} has dtype {x.dtype}; it takes bfloat16 or float16")
  if dtype is not None and x.dtype != dtype:
    raise TypeError(f"{_NAME}: {name} must have q's dtype {dtype}, got {x.dtype}")
  if 0 in x.shape:
    raise ValueError(f"{_NAME}: {name} has an empty dimension: shape {x.shape}")


def _check_int32(name, x, shape, described):
  x = jnp.asarray(x)
  if x.shape != tuple(shape) or x.dtype != np.int32:
    raise ValueError(
      f"{_NAME}: {name} must be int32 {described} = {list(shape)}, got {x.dtype}{list(x.shape)}"
    )
  return x
