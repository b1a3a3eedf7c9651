"""The public attention functions: argument checks, defaults and the custom VJP."""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jax_fa3 import _checks, reference, segment_kernels, sharding, strategy
from jax_fa3.primitives import AttentionParams, Fp8Params

# The one list of the dtypes jax_fa3 takes (the Flax adapters read it too).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# FP8 inputs (forward only, with descale factors); the outputs are in one of DTYPES.
FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
_MAX_HEAD_DIM = 256
# jax.nn's masked logit (-0.7 * float32 max): what it reports as the lse of a row that sees no key.
_JAX_NN_MASKED_LSE = np.float32(-0.7 * np.finfo(np.float32).max)


def flash_attention(
  q,
  k,
  v,
  *,
  segment_ids=None,
  kv_segment_ids=None,
  softmax_scale=None,
  causal=False,
  window_size=(-1, -1),
  softcap=0.0,
  sinks=None,
  return_lse=False,
  return_max_logit=False,
  deterministic=False,
  descale_q=None,
  descale_k=None,
  descale_v=None,
  out_dtype=None,
  context_parallel="auto",
):
  """FlashAttention-3: softmax(q kᵀ · softmax_scale) v, on Hopper kernels where compiled.

  Args:
    q: queries, `[batch, seqlen_q, heads, head_dim]`, bfloat16 or float16, or
      float8_e4m3fn (FP8: q, k and v all, see `descale_q`).
      float32 is refused with a TypeError: cast with `.astype(jnp.bfloat16)`,
      or use `dot_product_attention`, which hands float32 to `jax.nn`.
    k: keys, `[batch, seqlen_k, kv_heads, head_dim]`; `heads % kv_heads == 0`
      (grouped-query and multi-query attention).
    v: values, `[batch, seqlen_k, kv_heads, head_dim_v]`.
    segment_ids: packed sequences: integer `[batch, seqlen_q]`, the document of each
      query. Query `i` sees key `j` only if `segment_ids[i] == kv_segment_ids[j]` (and the
      causal/window rule below allows it, by positions within the row). A negative id is
      padding: its rows get output 0, lse -inf and no gradient, and its keys are seen by
      no one. Any ids work; contiguous documents are the fast case.
    kv_segment_ids: integer `[batch, seqlen_k]`, the keys' documents; defaults to
      `segment_ids` (then seqlen_q must equal seqlen_k).
    softmax_scale: multiplies q kᵀ; defaults to `1 / sqrt(head_dim)`. A static number
      in [1e-30, 1e4]: the scaled scores are float32, and up to 1e4 they stay finite for
      any |q kᵀ| < 3.4e34; a scale outside (or a non-finite one) raises a ValueError.
    causal: query `i` sees key `j` iff `j <= i + seqlen_k - seqlen_q`, i.e. the
      mask's diagonal is aligned bottom-right, as in FlashAttention. Same as
      `window_size=(left, 0)`.
    window_size: `(left, right)`: query `i` sees keys
      `[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]`; -1 is unbounded.
    softcap: if positive, scores become `softcap * tanh(scores / softcap)`. 0 (off) or
      a static number in [1e-30, 1e30] (the kernels' float32 arithmetic stays finite).
    sinks: attention sinks (as in gpt-oss): a float `[heads]` array, one learnable logit
      per query head that joins every row's softmax with no value:
      `lse_i = log(exp(sinks[h]) + sum_j exp(s_ij))`, `out_i = sum_j exp(s_ij - lse_i) v_j`.
      Differentiable (its gradient is float32). A row that sees no key then gets output 0
      and lse `sinks[h]`.
    return_lse: also return the log-sum-exp of the scores (differentiable).
    return_max_logit: also return the largest visible scaled (and softcapped) score of
      each (batch, head), float32 `[batch, heads]`, -inf where no row sees a key: what
      QK-clip / MuonClip needs. Taken from the kernel's running maximum; no gradient.
    deterministic: make the backward pass bitwise reproducible (slower).
    descale_q, descale_k, descale_v: FP8 only: the float32 factors that turn the e4m3
      values back into the real ones (x = x8 * descale), each a scalar or
      `[batch, kv_heads]` (FlashAttention-3's convention, for descale_q too: query head h
      takes the factor of its k/v head h // (heads // kv_heads)); None is 1. The scores
      become `(q8 · k8) * descale_q * descale_k * softmax_scale` and the output is
      multiplied by descale_v.
    out_dtype: the output dtype. For float8_e4m3fn inputs bfloat16 (the default) or
      float16 where a kernel writes it (`kernels_available()`; the reference path writes
      both); for 16-bit inputs None or their own dtype.
    context_parallel: how a sequence split over devices (q's and k's sequence sharded
      under `jax.jit`) runs: "auto" (the default) picks by a cost model of shape, device
      count and mask; "ring" passes K/V chunks round the devices (ring attention);
      "all_gather" gathers K/V whole on each device, which keeps its queries. No effect
      on arrays whose sequence is not split. `jax_fa3.sharding.choose_split(...).reason`
      says which runs and why; a forced "ring" that cannot run the split raises a
      ValueError that says why.

  `causal`, `return_lse`, `return_max_logit` and `deterministic` are static Python (or
  NumPy) bools, and `softmax_scale`, `softcap` and `window_size` static numbers: they
  select the kernel and the outputs, so a traced value raises a TypeError that says so.

  FP8 (float8_e4m3fn q, k, v) runs the FP8 forward kernels: the probabilities are rounded
  to e4m3 before they multiply v (with an exact row sum), and nothing else changes. It
  takes no `segment_ids`/`kv_segment_ids` and no `deterministic` (there is no FP8
  backward), and has no gradient: `jax.grad` through it raises an error; use
  `jax_fa3.fp8_attention`, which takes 16-bit inputs, quantizes them and is differentiable.

  Head dims up to 256 are supported; sizes without a compiled kernel are padded
  up to the next one. A query row that sees no key gets output 0 and lse -inf (the
  sink with sinks), and passes no gradient to q, k and v.

  Returns:
    `out [batch, seqlen_q, heads, head_dim_v]` in q's dtype; with `return_lse` and/or
    `return_max_logit` a tuple `(out, lse, max_logit)` of those asked for, with
    `lse [batch, heads, seqlen_q]` float32 (natural log).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  fp8 = _check_qkv(q, k, v)
  context_parallel = strategy.check("flash_attention", context_parallel)
  causal, return_lse, return_max_logit, deterministic = _check_flags(
    causal=causal,
    return_lse=return_lse,
    return_max_logit=return_max_logit,
    deterministic=deterministic,
  )
  params = _flash_params(
    q.shape[3], softmax_scale, causal, window_size, softcap, diagonal_offset=k.shape[1] - q.shape[1]
  )
  sinks = _check_sinks("flash_attention", sinks, q.shape[0], q.shape[2])
  out_dtype = _check_out_dtype(out_dtype, q.dtype)
  descales = _check_descales(q, k, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v)
  if fp8:
    for name, used in (
      ("segment_ids", segment_ids is not None),
      ("kv_segment_ids", kv_segment_ids is not None),
      ("deterministic", deterministic),
    ):
      if used:
        raise ValueError(
          f"flash_attention: {name} is not supported with float8_e4m3fn "
          f"inputs (the FP8 kernels are forward only, without packed "
          f"sequences); run this call in bfloat16 or float16"
        )
    out, lse, *max_logit = fp8_forward(
      q, k, v, descales, sinks, params, Fp8Params(out_dtype), return_max_logit
    )
    return _results(out, lse if return_lse else None, *max_logit)
  absent = jnp.zeros((0,), jnp.int32)
  q_rows, kv_rows = absent, absent
  if segment_ids is not None or kv_segment_ids is not None:
    q_ids, kv_ids = _check_segment_ids(segment_ids, kv_segment_ids, q, k)
    q_rows, kv_rows = segment_kernels.rows(
      q_ids,
      kv_ids,
      window_left=params.window_left,
      window_right=params.window_right,
      q_offsets=jnp.full(q_ids.shape, params.diagonal_offset, jnp.int32),
      kv_offsets=jnp.full(kv_ids.shape, params.diagonal_offset, jnp.int32),
    )
  out, lse, *max_logit = _attention(
    q,
    k,
    v,
    absent,
    absent,
    q_rows,
    kv_rows,
    sinks,
    params,
    deterministic,
    return_max_logit,
    context_parallel,
  )
  return _results(out, lse if return_lse else None, *max_logit)


def _results(out, lse=None, max_logit=None):
  """out alone, or the tuple of out and the extras asked for."""
  extras = tuple(x for x in (lse, max_logit) if x is not None)
  return (out, *extras) if extras else out


def flash_attention_varlen(
  q,
  k,
  v,
  cu_seqlens_q,
  cu_seqlens_k,
  *,
  max_seqlen_q=None,
  max_seqlen_k=None,
  seqused_q=None,
  seqused_k=None,
  softmax_scale=None,
  causal=False,
  window_size=(-1, -1),
  softcap=0.0,
  sinks=None,
  return_lse=False,
  return_max_logit=False,
  deterministic=False,
  context_parallel="auto",
):
  """FlashAttention's variable-length form: sequences concatenated along one token axis.

  Args:
    q: `[total_q, heads, head_dim]`, the queries of every sequence, one after another.
    k, v: `[total_k, kv_heads, head_dim]` and `[total_k, kv_heads, head_dim_v]`.
    cu_seqlens_q, cu_seqlens_k: int32 `[num_seqs + 1]`: sequence `s` holds tokens
      `[cu_seqlens[s], cu_seqlens[s + 1])`. Empty sequences are allowed. A sequence whose
      bounds decrease or pass the end of the array gets NaN outputs (checked on the
      device; nothing is read out of bounds); tokens after `cu_seqlens[-1]` get 0.
    max_seqlen_q, max_seqlen_k: accepted for FlashAttention compatibility; jax_fa3 plans
      its tiles from the cu_seqlens themselves and does not need them.
    seqused_q, seqused_k: optional int32 `[num_seqs]`: only the first `seqused[s]` tokens
      of sequence `s` take part (the rest get output 0).
    causal, window_size: as in `flash_attention`, within each sequence, aligned
      bottom-right on its (used) lengths.
    The other arguments are `flash_attention`'s (`context_parallel` applies to a split
    token axis).

  Returns:
    `out [total_q, heads, head_dim_v]`, or a tuple with `lse [heads, total_q]` and/or
    `max_logit [heads]` (the largest score over all sequences), as asked for.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  context_parallel = strategy.check("flash_attention_varlen", context_parallel)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 3:
      raise ValueError(
        f"flash_attention_varlen: {name} must have rank 3 [total_tokens, heads, "
        f"head_dim], got shape {x.shape}"
      )
  for name, bound in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
    _checks.refuse_traced(
      name, bound, "FlashAttention takes it as a Python int (jax_fa3 needs none: None will do)"
    )
    if bound is not None and not (_is_int(bound) and bound >= 0):
      raise ValueError(f"flash_attention_varlen: {name} must be an int >= 0, got {bound!r}")
  cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
  cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
  if cu_q.shape != cu_k.shape:
    raise ValueError(
      f"flash_attention_varlen: cu_seqlens_q {list(cu_q.shape)} and cu_seqlens_k "
      f"{list(cu_k.shape)} must describe the same number of sequences"
    )
  num_seqs = cu_q.shape[0] - 1
  used_q = _check_seq_lengths("seqused_q", seqused_q, num_seqs)
  used_k = _check_seq_lengths("seqused_k", seqused_k, num_seqs)
  q4, k4, v4 = q[None], k[None], v[None]
  if _check_qkv(q4, k4, v4):
    raise TypeError(
      "flash_attention_varlen: float8_e4m3fn inputs are not supported (the FP8 "
      "kernels have no variable-length form); use flash_attention with "
      "[batch, seqlen, heads, head_dim] arrays, or bfloat16/float16 here"
    )
  causal, return_lse, return_max_logit, deterministic = _check_flags(
    causal=causal,
    return_lse=return_lse,
    return_max_logit=return_max_logit,
    deterministic=deterministic,
  )
  # The diagonals are per sequence, in the rows below; the params' offset is unused.
  params = _flash_params(q.shape[2], softmax_scale, causal, window_size, softcap, diagonal_offset=0)
  sinks = _check_sinks("flash_attention_varlen", sinks, 1, q.shape[1])
  q_ids, q_start, q_length, bad_q = _sequence_of_tokens(cu_q, used_q, q.shape[0])
  kv_ids, k_start, k_length, bad_k = _sequence_of_tokens(cu_k, used_k, k.shape[0])
  # Bottom-right alignment in each sequence: query a of s sits on key a + Lk - Lq of s.
  offset = (k_start + k_length) - (q_start + q_length)
  q_rows, kv_rows = segment_kernels.rows(
    q_ids[None],
    kv_ids[None],
    window_left=params.window_left,
    window_right=params.window_right,
    q_offsets=offset[jnp.maximum(q_ids, 0)][None],
    kv_offsets=offset[jnp.maximum(kv_ids, 0)][None],
  )
  absent = jnp.zeros((0,), jnp.int32)
  out, lse, *max_logit = _attention(
    q4,
    k4,
    v4,
    absent,
    absent,
    q_rows,
    kv_rows,
    sinks,
    params,
    deterministic,
    return_max_logit,
    context_parallel,
  )
  # Tokens of a malformed sequence (of q's or k's bounds): NaN, never a silent number.
  bad_tokens = _tokens_of(bad_q | bad_k, cu_q, q.shape[0])
  out = jnp.where(bad_tokens[:, None, None], jnp.nan, out[0]).astype(q.dtype)
  lse = jnp.where(bad_tokens[None], jnp.nan, lse[0])
  max_logit = [jnp.where(jnp.any(bad_tokens), jnp.nan, m[0]) for m in max_logit]
  return _results(out, lse if return_lse else None, *max_logit)


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
  implementation=None,
  return_residual=False,
  context_parallel="auto",
):
  """A drop-in for `jax.nn.dot_product_attention`, with exactly its semantics.

  That includes its top-left causal alignment when T != S, its handling of
  padded and fully masked rows, and its residual (the lse, shaped like the
  output without its last axis, in the input dtype, without gradient).

  `implementation`:
    None: jax_fa3 where it applies (bfloat16/float16, head dim <= 256, no bias,
      no dense mask, a static scale, non-negative windows), `jax.nn` otherwise.
    "fa3": jax_fa3, or a ValueError/TypeError naming what it does not support.
    "xla", "cudnn": passed through to `jax.nn.dot_product_attention`.

  `context_parallel` (jax_fa3's own, not jax.nn's): how jax_fa3 runs a sequence split over
  devices, as in `flash_attention`; checked with every implementation, used by jax_fa3's.

  `is_causal` and `return_residual` must be static bools with every implementation (a
  string such as "False" would otherwise be taken as true). With None and "fa3",
  arguments that break jax.nn's own rules raise a ValueError or TypeError naming the
  argument, whichever implementation would run: ranks other than 3 or 4, non-floating
  inputs, a `bias` or `mask` that does not broadcast to [batch, heads, T, S], a complex
  `bias`, a window that is not an int or a pair of ints, a non-finite `scale`. Should
  jax.nn still refuse arguments that jax_fa3 can't take either, the error says both
  reasons. Empty sequences and head dims run on jax.nn, which returns an empty (or
  all-zero) result.
  """
  is_causal, return_residual = _check_flags(is_causal=is_causal, return_residual=return_residual)
  context_parallel = strategy.check("dot_product_attention", context_parallel)
  if implementation in ("xla", "cudnn"):
    return _jax_nn(
      query,
      key,
      value,
      bias,
      mask,
      scale,
      is_causal,
      query_seq_lengths,
      key_value_seq_lengths,
      local_window_size,
      implementation,
      return_residual,
    )
  if implementation not in (None, "fa3"):
    raise ValueError(
      f"Unsupported implementation option: {implementation!r}; choose None, 'fa3', 'xla' or 'cudnn'"
    )
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if _is_int(local_window_size):
    local_window_size = (local_window_size, local_window_size)
  bias, mask, query_seq_lengths, key_value_seq_lengths = _check_like_jax_nn(
    query,
    key,
    value,
    bias,
    mask,
    scale,
    query_seq_lengths,
    key_value_seq_lengths,
    local_window_size,
  )
  unsupported = _unsupported_by_fa3(query, key, value, bias, mask, scale, local_window_size)
  if unsupported:
    if implementation == "fa3":
      raise unsupported
    try:
      return _jax_nn(
        query,
        key,
        value,
        bias,
        mask,
        scale,
        is_causal,
        query_seq_lengths,
        key_value_seq_lengths,
        local_window_size,
        None,
        return_residual,
      )
    except (TypeError, ValueError) as jax_nn_error:  # what the checks above did not foresee
      raise _checks.refused_by_both(unsupported, jax_nn_error) from jax_nn_error

  output_shape = query.shape
  if query.ndim == 3:
    query, key, value = query[None], key[None], value[None]
  _, seqlen_q, _, head_dim = query.shape
  seqlen_k = key.shape[1]
  window_left, window_right = local_window_size or (-1, -1)
  params = AttentionParams(
    softmax_scale=head_dim**-0.5 if scale is None else float(scale),
    window_left=window_left,
    window_right=0 if is_causal else window_right,
    diagonal_offset=0,
  )  # jax.nn aligns the causal mask top-left.
  seqused_q = _seqused(query_seq_lengths, seqlen_q)
  seqused_k = _seqused(key_value_seq_lengths, seqlen_k)
  absent = jnp.zeros((0,), jnp.int32)
  out, lse = _attention(
    query,
    key,
    value,
    seqused_q,
    seqused_k,
    absent,
    absent,
    jnp.zeros((0,), jnp.float32),
    params,
    False,
    False,
    context_parallel,
  )
  # Without lengths or a window every query row sees key 0 (the causal mask is top-left
  # aligned here): no row is key-less.
  keyless_rows = not (
    query_seq_lengths is None and key_value_seq_lengths is None and local_window_size is None
  )
  out, residual = _as_jax_nn_gives(out, lse, value, query_seq_lengths, keyless_rows)
  if return_residual:
    return out.reshape(output_shape), residual.reshape(output_shape[:-1])
  return out.reshape(output_shape)


def _as_jax_nn_gives(out, lse, value, query_seq_lengths, keyless_rows):
  """Our (out, lse) turned into jax.nn's (out, residual), gradients included.

  jax.nn masks with a finite logit, so a row that sees no key averages all values
  uniformly (unless it is a padded query row, which it zeroes) and reports that logit
  as its lse. The residual is the lse as [B, T, N] in the input dtype, without gradient.
  Where no row can be key-less (`keyless_rows` false) out is returned as it is, which
  saves a float32 pass over out and value, and its gradient, in every call.
  """
  residual = jnp.swapaxes(lse, 1, 2)
  if keyless_rows:
    _, seqlen_q, heads, _ = out.shape
    sees_nothing = residual == -jnp.inf
    averaged = sees_nothing
    if query_seq_lengths is not None:
      averaged &= jnp.arange(seqlen_q)[None, :, None] < query_seq_lengths[:, None, None]
    # In float32, so that the gradient's sum over the averaged rows is float32 too.
    mean_value = jnp.mean(value.astype(jnp.float32), axis=1)
    mean_value = jnp.repeat(mean_value, heads // value.shape[2], axis=1)[:, None]
    out = jnp.where(averaged[..., None], mean_value, out.astype(jnp.float32)).astype(out.dtype)
    residual = jnp.where(sees_nothing, _JAX_NN_MASKED_LSE, residual)
  return out, jax.lax.stop_gradient(residual.astype(out.dtype))


# --- The custom VJP --------------------------------------------------------------


# The mask operands (lengths, packed-sequence rows) are int32 and get no cotangent. sinks
# (float32 [batch, heads], or [0] when absent) do; max_logit, when asked for, has none.
# `context_parallel` says how a sequence split over devices runs (sharding.choose_split).
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  params,
  deterministic,
  return_max_logit,
  context_parallel,
):
  del deterministic
  return tuple(
    sharding.attention_fwd(
      q,
      k,
      v,
      seqused_q,
      seqused_k,
      q_rows,
      kv_rows,
      sinks,
      params,
      return_max_logit,
      context_parallel=context_parallel,
    )
  )


def _attention_fwd(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  params,
  deterministic,
  return_max_logit,
  context_parallel,
):
  del deterministic
  q, k, v, sinks, *mask = (x.value for x in (q, k, v, sinks, seqused_q, seqused_k, q_rows, kv_rows))
  results = tuple(
    sharding.attention_fwd(
      q, k, v, *mask, sinks, params, return_max_logit, context_parallel=context_parallel
    )
  )
  out, lse = results[:2]
  return results, (q, k, v, mask, sinks, out, lse)


def _attention_bwd(
  params, deterministic, return_max_logit, context_parallel, residuals, cotangents
):
  del return_max_logit  # the max logit passes no gradient
  q, k, v, mask, sinks, out, lse = residuals
  dout, dlse = cotangents[:2]
  if isinstance(dout, SymbolicZero):
    dout = jnp.zeros_like(out)
  mask_grads = (None,) * len(mask)
  if not isinstance(dlse, SymbolicZero):
    # d lse_i / d score_ij = P_ij, so lse's cotangent adds dlse_i to every dP_ij.
    # A column of ones in v, dlse in dout and zeros in out does exactly that
    # (rowsum(dout * out) is unchanged); the extra dv column is dropped. The wider
    # head dim costs time, so this runs only when the lse is differentiated.
    ones = jnp.ones((*v.shape[:3], 1), v.dtype)
    dout = jnp.concatenate([dout, jnp.swapaxes(dlse, 1, 2)[..., None].astype(dout.dtype)], -1)
    out = jnp.concatenate([out, jnp.zeros((*out.shape[:3], 1), out.dtype)], -1)
    dq, dk, dv, *dsinks = sharding.attention_bwd(
      dout,
      q,
      k,
      jnp.concatenate([v, ones], -1),
      out,
      lse,
      *mask,
      sinks,
      params,
      deterministic,
      context_parallel,
    )
    if sinks.size:  # d lse_i / d sink = exp(sink - lse_i): the lse's own share of dsinks
      lse_share = reference.sink_gradient(sinks, lse, dlse)
      dsinks = [dsinks[0] - sharding.sharded_like(lse_share, sinks)]
    return (dq, dk, dv[..., :-1], *mask_grads, *(dsinks or [None]))
  dq, dk, dv, *dsinks = sharding.attention_bwd(
    dout, q, k, v, out, lse, *mask, sinks, params, deterministic, context_parallel
  )
  return (dq, dk, dv, *mask_grads, *(dsinks or [None]))


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


# --- FP8 --------------------------------------------------------------------------


def fp8_forward(
  q, k, v, descales, sinks, params: AttentionParams, fp8: Fp8Params, return_max_logit=False
):
  """The FP8 forward on float8_e4m3fn q, k, v and their descales in the contract's block
  forms (CONTRACT.md): (descale_q [B, H, QB], descale_k [B, Hk, KB], descale_v [B, Hk]),
  each None or shape [0] when absent, a block covering fp8.q_block_rows query rows or
  fp8.k_block_rows keys. Returns (out, lse[, max_logit]); no gradient (an error that
  names fp8_attention). `sinks` is float32 [B, H] or absent (shape [0])."""
  descales = tuple(jnp.zeros((0,), jnp.float32) if x is None else x for x in descales)
  return _fp8_forward(q, k, v, sinks, *descales, params, fp8, bool(return_max_logit))


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8, 9))
def _fp8_forward(q, k, v, sinks, descale_q, descale_k, descale_v, params, fp8, return_max_logit):
  absent = jnp.zeros((0,), jnp.int32)
  return tuple(
    sharding.attention_fwd(
      q,
      k,
      v,
      absent,
      absent,
      absent,
      absent,
      sinks,
      params,
      return_max_logit,
      (descale_q, descale_k, descale_v),
      fp8,
    )
  )


@_fp8_forward.defjvp
def _no_fp8_gradient(params, fp8, return_max_logit, primals, tangents):
  del params, fp8, return_max_logit, primals, tangents
  raise TypeError(
    "flash_attention has no gradient for float8_e4m3fn inputs: there is no FP8 backward "
    "kernel. For a differentiable FP8 forward use jax_fa3.fp8_attention(q, k, v, ...) on "
    "bfloat16/float16 inputs: it quantizes them itself and takes its gradient from the "
    "16-bit backward on the dequantized inputs."
  )


def _check_out_dtype(out_dtype, dtype):
  """The output dtype's name for FP8 inputs (default bfloat16), or None for 16-bit ones,
  whose output has their own dtype."""
  if out_dtype is not None:
    try:
      out_dtype = jnp.dtype(out_dtype)
    except TypeError as e:
      raise TypeError(f"flash_attention: out_dtype must be a dtype, got {out_dtype!r}") from e
  if dtype != FP8_DTYPE:
    if out_dtype not in (None, dtype):
      raise ValueError(
        f"flash_attention: out_dtype={out_dtype} is for float8_e4m3fn inputs; "
        f"{dtype} inputs give {dtype} outputs (pass out_dtype=None)"
      )
    return None
  if out_dtype is None:
    return "bfloat16"
  if out_dtype not in DTYPES:
    raise ValueError(
      f"flash_attention: out_dtype must be bfloat16 or float16 for "
      f"float8_e4m3fn inputs, got {out_dtype}"
    )
  return out_dtype.name


def _check_descales(q, k, **descales):
  """descale_q, descale_k, descale_v (each None, a positive number or a float32 array of
  shape [] or [batch, kv_heads]) as the FP8 forward's block forms: float32 [B, H, 1],
  [B, Hk, 1], [B, Hk], None where not given. Given with 16-bit inputs: a ValueError."""
  given = [name for name, x in descales.items() if x is not None]
  if q.dtype != FP8_DTYPE:
    if given:
      raise ValueError(
        f"flash_attention: {given[0]} is only for float8_e4m3fn inputs; q, k "
        f"and v have dtype {q.dtype}, which needs no descaling"
      )
    return (None,) * 3
  batch, _, heads, _ = q.shape
  kv_heads = k.shape[2]
  shaped = []
  for name, x in descales.items():
    if x is None:
      shaped.append(None)
      continue
    if _is_python_number(x):
      if not 0 < float(x) < np.inf:
        raise ValueError(f"flash_attention: {name} must be a finite number > 0, got {x!r}")
      x = jnp.float32(x)
    x = jnp.asarray(x)
    if x.dtype != np.float32 or x.shape not in ((), (batch, kv_heads)):
      raise ValueError(
        f"flash_attention: {name} must be a number or a float32 array of shape "
        f"[] or [batch, kv_heads] = [{batch}, {kv_heads}], got "
        f"{x.dtype}{list(x.shape)}"
      )
    x = jnp.broadcast_to(x, (batch, kv_heads))
    if name == "descale_q":  # per query head: its k/v head's factor
      x = jnp.repeat(x, heads // kv_heads, axis=1)
    shaped.append(x if name == "descale_v" else x[:, :, None])
  return tuple(shaped)


def _is_python_number(x):
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


# --- Argument checks -------------------------------------------------------------


def _check_qkv(q, k, v, function="flash_attention"):
  """Checks q, k, v for `function` (named in the errors); returns whether they are FP8
  (float8_e4m3fn)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
        f"{function}: {name} must have rank 4 [batch, seqlen, heads, head_dim], got shape {x.shape}"
      )
    if x.dtype not in (*DTYPES, FP8_DTYPE):
      raise TypeError(
        f"{function}: {name} has dtype {x.dtype}; it takes bfloat16 or "
        "float16 (or float8_e4m3fn q, k and v with descale factors). Cast "
        "float32 inputs with .astype(jnp.bfloat16), or use "
        "jax_fa3.dot_product_attention, which hands float32 to jax.nn."
      )
    if 0 in x.shape:
      raise ValueError(f"{function}: {name} has an empty dimension: shape {x.shape}")
  if not q.dtype == k.dtype == v.dtype:
    fp8_rule = (
      " (FP8 attention takes q, k and v all float8_e4m3fn)"
      if FP8_DTYPE in (q.dtype, k.dtype, v.dtype)
      else ""
    )
    raise TypeError(
      f"{function}: q, k and v must share one dtype{fp8_rule}, got {q.dtype}, {k.dtype}, {v.dtype}"
    )
  shapes = f"q {q.shape}, k {k.shape}, v {v.shape}"
  if not q.shape[0] == k.shape[0] == v.shape[0]:
    raise ValueError(f"{function}: q, k and v must have the same batch size: {shapes}")
  if k.shape[3] != q.shape[3]:
    raise ValueError(f"{function}: k's head dim must equal q's: {shapes}")
  if v.shape[1:3] != k.shape[1:3]:
    raise ValueError(f"{function}: v must have k's seqlen and heads: {shapes}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"{function}: q's heads ({q.shape[2]}) must be a multiple of "
      f"k/v's heads ({k.shape[2]}): {shapes}"
    )
  if max(q.shape[3], v.shape[3]) > _MAX_HEAD_DIM:
    raise ValueError(f"{function}: head dims must be at most {_MAX_HEAD_DIM}: {shapes}")
  return q.dtype == FP8_DTYPE


def _flash_params(head_dim, softmax_scale, causal, window_size, softcap, diagonal_offset):
  """flash_attention's static arguments, checked, as the primitives' parameters."""
  window_left, window_right = _check_window("window_size", window_size)
  return AttentionParams(
    softmax_scale=_softmax_scale(softmax_scale, head_dim),
    softcap=_check_softcap(softcap),
    window_left=window_left,
    window_right=0 if causal else window_right,
    diagonal_offset=diagonal_offset,
  )


def _check_segment_ids(segment_ids, kv_segment_ids, q, k):
  """The ids as int32 `[batch, seqlen_q]` and `[batch, seqlen_k]`, or a clear error."""
  if segment_ids is None:
    raise ValueError(
      "flash_attention: kv_segment_ids needs segment_ids (the queries' documents) too"
    )
  if kv_segment_ids is None:
    if q.shape[1] != k.shape[1]:
      raise ValueError(
        f"flash_attention: kv_segment_ids is needed when seqlen_q "
        f"({q.shape[1]}) != seqlen_k ({k.shape[1]}); segment_ids alone "
        "serves both only for equal lengths"
      )
    kv_segment_ids = segment_ids
  checked = []
  for name, ids, shape in (
    ("segment_ids", segment_ids, q.shape[:2]),
    ("kv_segment_ids", kv_segment_ids, k.shape[:2]),
  ):
    ids = jnp.asarray(ids)
    if ids.shape != shape or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(
        f"flash_attention: {name} must be integers of shape [batch, seqlen] = "
        f"{list(shape)}, got {ids.dtype}{list(ids.shape)}"
      )
    checked.append(ids.astype(jnp.int32))
  return tuple(checked)


def _check_sinks(function, sinks, batch, heads):
  """The sinks as float32 [batch, heads] (broadcast over the batch, so that their gradient
  sums over it), or an absent float32 [0]."""
  if sinks is None:
    return jnp.zeros((0,), jnp.float32)
  sinks = jnp.asarray(sinks)
  if sinks.shape != (heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise ValueError(
      f"{function}: sinks must be a float array of shape [heads] = [{heads}] "
      f"(one logit per query head), got {sinks.dtype}{list(sinks.shape)}"
    )
  return jnp.broadcast_to(sinks.astype(jnp.float32)[None], (batch, heads))


def _check_cu_seqlens(name, cu_seqlens):
  cu_seqlens = jnp.asarray(cu_seqlens)
  if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype != np.int32:
    raise ValueError(
      f"flash_attention_varlen: {name} must be int32 of shape [num_seqs + 1], "
      f"got {cu_seqlens.dtype}{list(cu_seqlens.shape)}"
    )
  return cu_seqlens


def _sequence_of_tokens(cu_seqlens, seqused, total):
  """Each token's sequence (-1 outside every used part), each sequence's start and used
  length, and which sequences are malformed (bounds that decrease or pass `total`)."""
  start, stop = cu_seqlens[:-1], cu_seqlens[1:]
  bad = (stop < start) | (start < 0) | (stop > total)
  length = jnp.maximum(stop - start, 0)
  if seqused is not None:
    length = jnp.clip(seqused, 0, length)
  tokens = jnp.arange(total, dtype=jnp.int32)
  # Well-formed bounds are sorted; searchsorted on others still gives an index in range.
  sequence = jnp.clip(
    jnp.searchsorted(stop, tokens, side="right", method="scan_unrolled"), 0, start.shape[0] - 1
  )
  sequence = sequence.astype(jnp.int32)
  inside = (tokens >= start[sequence]) & (tokens < start[sequence] + length[sequence])
  ids = jnp.where(inside & ~bad[sequence], sequence, -1)
  return ids, start, length, bad


def _tokens_of(flagged, cu_seqlens, total):
  """Tokens in [cu[s], cu[s+1]) (either order, clipped to the array) of the flagged s."""
  lo = jnp.clip(jnp.minimum(cu_seqlens[:-1], cu_seqlens[1:]), 0, total)
  hi = jnp.clip(jnp.maximum(cu_seqlens[:-1], cu_seqlens[1:]), 0, total)
  # A flagged sequence whose clipped range is empty (both bounds past the end) holds no
  # token to flag.
  edges = jnp.zeros((total + 1,), jnp.int32)
  edges = edges.at[lo].add(flagged.astype(jnp.int32)).at[hi].add(-flagged.astype(jnp.int32))
  return jnp.cumsum(edges)[:total] > 0


def _check_window(name, window):
  _checks.refuse_traced(name, window, "it selects the kernel's mask")
  if (
    not isinstance(window, (tuple, list))
    or len(window) != 2
    or not all(_is_int(w) and w >= -1 for w in window)
  ):
    raise ValueError(
      f"{name} must be a pair (left, right) of ints >= -1 (-1 = unbounded), got {window!r}"
    )
  return int(window[0]), int(window[1])


def _check_softcap(softcap):
  softcap = _static_float("softcap", softcap, 0.0)
  if rule := _checks.softcap_rule(softcap):
    raise ValueError(f"softcap {rule}, got {softcap}")
  return softcap


def _softmax_scale(softmax_scale, head_dim):
  scale = _static_float("softmax_scale", softmax_scale, head_dim**-0.5)
  if rule := _checks.softmax_scale_rule(scale):
    raise ValueError(f"softmax_scale {rule}, got {softmax_scale!r}")
  return scale


def _static_float(name, value, default):
  if value is None:
    return float(default)
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} must be a static Python number (it is a kernel attribute, "
      f"fixed when the call is traced), got the traced value {value}; pass it "
      "as a constant, e.g. through functools.partial or jit's static_argnames"
    )
  if not _is_real_scalar(value):
    raise TypeError(
      f"{name} must be a static Python number (it is a kernel attribute), "
      f"got {value!r} of type {type(value).__name__}"
    )
  return _checks.as_float(name, value)


def _is_real_scalar(x):
  """A real number (not a bool or a string), or a 0-d integer or floating array."""
  if isinstance(x, (bool, np.bool_)):
    return False
  return isinstance(x, numbers.Real) or _is_scalar_array(x, jnp.floating, jnp.integer)


def _is_scalar_array(x, *kinds):
  """A 0-d array (traced or not) whose dtype is one of `kinds`."""
  dtype = getattr(x, "dtype", None)
  return (
    getattr(x, "shape", None) == ()
    and dtype is not None
    and any(jnp.issubdtype(dtype, kind) for kind in kinds)
  )


# Why each flag must be static: what it selects when the call is traced.
_FLAG_ROLES = {
  "causal": "it selects the kernel's mask",
  "is_causal": "it selects the attention mask",
  "deterministic": "it selects the backward kernel's mode",
  "hadamard": "it selects how the inputs are quantized",
  "block_quantize": "it selects how the inputs are quantized",
  "split_kv": "it selects how the inputs are quantized",
  "return_lse": "it sets how many arrays the call returns",
  "return_max_logit": "it sets how many arrays the call returns",
  "return_residual": "it sets how many arrays the call returns",
}


def _check_flags(**flags):
  """The flags as Python bools; a TypeError naming the first that is not a static bool
  (a Python or NumPy bool: not a string, a number or a traced value)."""
  for name, value in flags.items():
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"{name} must be static, a Python bool, not a traced value: "
        f"{_FLAG_ROLES[name]} when the call is traced. Pass it as a constant, "
        "e.g. through functools.partial or jit's static_argnames"
      )
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(
        f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}"
      )
  return tuple(bool(value) for value in flags.values())


def _is_int(x):
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _unsupported_by_fa3(query, key, value, bias, mask, scale, local_window_size):
  """The exception `implementation="fa3"` raises for these arguments, or None."""
  ranks = (query.ndim, key.ndim, value.ndim)
  if bias is not None:
    return ValueError(
      "implementation='fa3' does not support `bias`; use implementation=None to fall back to jax.nn"
    )
  if mask is not None:
    return ValueError(
      "implementation='fa3' does not support a dense `mask`; express it with "
      "is_causal, local_window_size and the *_seq_lengths, or use "
      "implementation=None to fall back to jax.nn"
    )
  if ranks not in ((3, 3, 3), (4, 4, 4)):
    return ValueError(
      f"implementation='fa3' takes query, key and value all of rank 4 (BTNH) "
      f"or all of rank 3 (TNH), got ranks {ranks}"
    )
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.dtype not in DTYPES:
      return TypeError(
        f"implementation='fa3' takes bfloat16 or float16, got {name} of dtype "
        f"{x.dtype}; cast it, or use implementation=None to fall back to jax.nn"
      )
  if max(query.shape[-1], value.shape[-1]) > _MAX_HEAD_DIM:
    return ValueError(
      f"implementation='fa3' supports head dims up to {_MAX_HEAD_DIM}, got "
      f"query {query.shape}, value {value.shape}"
    )
  if 0 in query.shape or 0 in key.shape:
    return ValueError(
      f"implementation='fa3' needs query and key without an empty "
      f"dimension, got query {query.shape}, key {key.shape}; use "
      "implementation=None to get jax.nn's empty result"
    )
  if scale is not None:
    if isinstance(scale, jax.core.Tracer):
      return TypeError(
        f"implementation='fa3' needs a static `scale` (a kernel attribute), got {scale!r}"
      )
    if rule := _checks.softmax_scale_rule(float(scale)):
      return ValueError(f"implementation='fa3': `scale` {rule}, got {scale!r}")
  if local_window_size is not None and not (
    isinstance(local_window_size, (tuple, list))
    and len(local_window_size) == 2
    and all(_is_int(w) and w >= 0 for w in local_window_size)
  ):
    return ValueError(
      "implementation='fa3' takes local_window_size as an int or a pair of "
      f"ints >= 0, got {local_window_size!r}"
    )
  return None


def _check_like_jax_nn(
  query, key, value, bias, mask, scale, query_seq_lengths, key_value_seq_lengths, local_window_size
):
  """jax.nn.dot_product_attention's rules, with errors that name the argument.

  What breaks them is refused whichever implementation would run, rather than left to
  fail inside jax.nn or, worse, to return a result there (integer inputs, a float window,
  a NaN scale). Returns bias, mask and the lengths as arrays.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim not in (3, 4):
      raise ValueError(
        f"{name} must have rank 4 [batch, seqlen, heads, head_dim] or rank 3 "
        f"[seqlen, heads, head_dim], got shape {x.shape}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
  if query.dtype != key.dtype or value.dtype != key.dtype:
    raise ValueError(
      f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
    )
  # Like jax.nn, a rank-3 array is one batch element.
  q_shape, k_shape, v_shape = ((1,) * (4 - x.ndim) + x.shape for x in (query, key, value))
  if v_shape != k_shape:
    raise ValueError(
      f"value shape {value.shape} must equal key shape {key.shape} "
      "[batch, kv_seqlen, kv_heads, head_dim]"
    )
  if q_shape[0] != k_shape[0]:
    raise ValueError(
      f"query and key must have the same batch size (a rank-3 array has "
      f"batch 1), got query {query.shape}, key {key.shape}"
    )
  if q_shape[3] != k_shape[3]:
    raise ValueError(
      f"query and key must have the same head_dim (last axis), got query "
      f"{query.shape}, key {key.shape}"
    )
  batch, seqlen_q, heads, _ = q_shape
  seqlen_k, kv_heads = k_shape[1:3]
  if kv_heads == 0 or heads % kv_heads:
    raise ValueError(
      f"The number of query heads must be a multiple of key/value heads, "
      f"got query {query.shape}, key {key.shape}"
    )

  logits_shape = (batch, heads, seqlen_q, seqlen_k)
  bias, mask = (None if x is None else jnp.asarray(x) for x in (bias, mask))
  for name, x in (("bias", bias), ("mask", mask)):
    if x is not None and not (
      x.ndim <= 4 and all(d in (1, n) for d, n in zip((1,) * (4 - x.ndim) + x.shape, logits_shape))
    ):
      raise ValueError(
        f"{name} must broadcast to [batch, heads, T, S] = {list(logits_shape)} "
        f"(each axis that size or 1), got shape {x.shape}"
      )
  if bias is not None and jnp.issubdtype(bias.dtype, jnp.complexfloating):
    raise TypeError(f"bias must be real (it is added to the scores), got dtype {bias.dtype}")
  if mask is not None and mask.dtype != np.bool_:
    raise TypeError(
      f"mask must be boolean (True where a query attends to a key), got dtype {mask.dtype}"
    )

  if scale is not None:
    if not _is_real_scalar(scale):
      raise TypeError(f"scale must be a real number or a scalar array, got {scale!r}")
    if not isinstance(scale, jax.core.Tracer) and not np.isfinite(_checks.as_float("scale", scale)):
      raise ValueError(f"scale must be finite, got {scale!r}")
  if local_window_size is not None and not (
    isinstance(local_window_size, (tuple, list))
    and len(local_window_size) == 2
    and all(_is_int(w) or _is_scalar_array(w, jnp.integer) for w in local_window_size)
  ):
    raise ValueError(
      f"local_window_size must be an int or a pair (left, right) of ints, got {local_window_size!r}"
    )
  return (
    bias,
    mask,
    _check_seq_lengths("query_seq_lengths", query_seq_lengths, batch),
    _check_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, batch),
  )


def _check_seq_lengths(name, lengths, batch):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or lengths.dtype != np.int32:
    raise ValueError(
      f"{name} must be int32 of shape (batch,) = ({batch},), got "
      f"{lengths.dtype}{list(lengths.shape)}"
    )
  return lengths


def _seqused(lengths, seqlen):
  """jax.nn's lengths as the kernels' seqused: clipped to [0, seqlen], or absent."""
  if lengths is None:
    return jnp.zeros((0,), jnp.int32)
  return jnp.clip(lengths, 0, seqlen)


def _jax_nn(
  query,
  key,
  value,
  bias,
  mask,
  scale,
  is_causal,
  query_seq_lengths,
  key_value_seq_lengths,
  local_window_size,
  implementation,
  return_residual,
):
  return jax.nn.dot_product_attention(
    query,
    key,
    value,
    bias,
    mask,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    implementation=implementation,
    return_residual=return_residual,
  )
