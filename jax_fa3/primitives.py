"""The forward and backward attention primitives, on one device's arrays.

Their operands, results and parameters are those of the FFI contract
(`cuda/ffi/CONTRACT.md`); `reference.py` states their semantics in JAX.
`sharding.py` lifts them to a device mesh as the `fa3_fwd` and `fa3_bwd` primitives
that attention.py binds.
- fwd: (q, k, v, seqused_q, seqused_k, q_rows, kv_rows, sinks, descale_q, descale_k,
  descale_v) -> (out, lse[, max_logit])
- bwd: (dout, q, k, v, out, lse, seqused_q, seqused_k, q_rows, kv_rows, sinks)
  -> (dq, dk, dv[, dsinks])
- decode: (q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table)
  -> (out, lse, k_cache, v_cache), the caches updated in place (no VJP; its vmap rule is
  `decode_batch`; sharding.py lifts it to a mesh for kvcache.py)
An absent `seqused_*` or rows (packed sequences, `segments.py`) is an int32 array of
shape [0], absent sinks and descales float32 ones. With rows, the CUDA lowering adds their
tile plans to the FFI call. Sinks, max_logit and dsinks are float32 [batch, heads]; max_logit
is a result when the forward's `return_max_logit` parameter is set, dsinks when sinks are
given. The descales (float8_e4m3fn inputs only) are float32 `[batch, heads, QB]`,
`[batch, kv_heads, KB]` and `[batch, kv_heads]`; the forward's `fp8` parameter (`Fp8Params`,
None for 16-bit inputs) gives the output dtype and the rows one descale block covers.

On CUDA they lower to the FFI targets where a kernel is compiled for the
dtype and head dims, padding head dims up to the next compiled ones; anywhere
else, and for pairs without a kernel, they lower to the float32 reference.
vmap folds every mapped axis into the batch axis (decode: see `decode_batch`).
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from jax_fa3 import _kernels, reference, segment_kernels
from jax_fa3._primitive_rules import define_primitive


@dataclasses.dataclass(frozen=True)
class AttentionParams:
  """The static parameters both primitives share (CONTRACT.md's attributes)."""

  softmax_scale: float
  softcap: float = 0.0
  window_left: int = -1
  window_right: int = -1
  diagonal_offset: int = 0


@dataclasses.dataclass(frozen=True)
class Fp8Params:
  """The forward's parameters for float8_e4m3fn inputs: the output dtype name, and how many
  query rows (keys) one block of descale_q (descale_k) covers when it has more than one
  block (CONTRACT.md; the CUDA lowering checks them against the kernel's)."""

  out_dtype: str = "bfloat16"
  q_block_rows: int = 64
  k_block_rows: int = 128


def attention_fwd(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  params: AttentionParams,
  q_rows=None,
  kv_rows=None,
  sinks=None,
  return_max_logit=False,
  descales=None,
  fp8: Fp8Params | None = None,
):
  """Binds the forward primitive: returns (out, lse), and max_logit with `return_max_logit`.
  A seqused, rows, sinks or descale may be None (absent); `descales` is None or the tuple
  (descale_q, descale_k, descale_v)."""
  descales = (None,) * 3 if descales is None else descales
  return fwd_p.bind(
    q,
    k,
    v,
    *map(absent_if_none, (seqused_q, seqused_k, q_rows, kv_rows)),
    *(absent_if_none(x, jnp.float32) for x in (sinks, *descales)),
    **dataclasses.asdict(params),
    return_max_logit=bool(return_max_logit),
    fp8=fp8,
  )


def attention_bwd(
  dout,
  q,
  k,
  v,
  out,
  lse,
  seqused_q,
  seqused_k,
  params: AttentionParams,
  deterministic: bool,
  q_rows=None,
  kv_rows=None,
  sinks=None,
):
  """Binds the backward primitive: returns (dq, dk, dv), and dsinks with sinks. A seqused,
  rows or sinks may be None (absent)."""
  return bwd_p.bind(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *map(absent_if_none, (seqused_q, seqused_k, q_rows, kv_rows)),
    absent_if_none(sinks, jnp.float32),
    **dataclasses.asdict(params),
    deterministic=deterministic,
  )


def absent_if_none(operand, dtype=jnp.int32):
  """An absent seqused, rows or sinks is an empty array for the primitives. Sharded programs
  carry None instead and make the empty array where they bind: XLA's GPU compiler (jax
  0.11.2) crashes on a zero-sized operand of a manual computation."""
  return jnp.zeros((0,), dtype) if operand is None else operand


def none_if_absent(operand):
  return None if operand is None or operand.shape[0] == 0 else operand


# --- Workspace sizes ---------------------------------------------------------
# The workspace is an extra u8 result, so XLA owns the memory and the call stays
# CUDA-graph safe. The handlers refuse a smaller buffer: keep these two functions
# in step with cuda/ffi/.


def fwd_workspace_bytes() -> int:
  """Bytes of scratch the forward kernel needs (its tile-scheduler counters)."""
  return 256


def bwd_workspace_bytes(
  batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v, sinks=False
) -> int:
  """Bytes of scratch the backward kernels need, for the head dims they are launched with."""
  sq, sk = _round_up(seqlen_q, 128), _round_up(seqlen_k, 128)
  d, dv = _round_up(head_dim, 64), _round_up(head_dim_v, 64)
  parts = [
    4 * batch * heads * sq * d,  # dq accumulator, f32
    4 * batch * heads * sq,  # rowsum(dout * out)
    4 * batch * heads * sq,  # lse * log2(e)
    4 * batch * heads * (sq // 64),
  ]  # dq write-order semaphores
  if heads != kv_heads:  # GQA: dk, dv are summed over groups in f32,
    parts += [
      4 * batch * kv_heads * sk * d,
      4 * batch * kv_heads * sk * dv,
      4 * batch * kv_heads * (sk // 64),
    ]  # in order when deterministic
  if sinks:  # the preprocess blocks' dsinks parts (>= 8 rows each)
    parts.append(4 * batch * heads * (sq // 8))
  return sum(_round_up(p, 256) for p in parts)


DECODE_ROWS = 16  # query rows per decode CTA (cuda/decode/params.h: kDecodeRows)
DECODE_MAX_SPLITS = 128  # kDecodeMaxSplits


def decode_m_blocks(heads, kv_heads, seqlen_q) -> int:
  return -(-(heads // kv_heads) * seqlen_q // DECODE_ROWS)


def decode_workspace_bytes(batch, kv_heads, m_blocks, num_splits, head_dim) -> int:
  """The split-KV partials (float32 O and lse per split and row); 256 bytes without splits."""
  if num_splits <= 1:
    return 256
  rows = batch * kv_heads * m_blocks * num_splits * DECODE_ROWS
  return _round_up(4 * rows * head_dim, 256) + _round_up(4 * rows, 256)


# Keys a split needs for the kernel to run one CTA an SM rather than two (see decode_num_splits).
DECODE_LONG_SPLIT_KEYS = 1024


def decode_num_splits(
  batch, kv_heads, m_blocks, max_keys, block_n, ctas_per_sm, num_sms, paged=False
) -> int:
  """How many splits of the keys fill the GPU: the fewest that come within 5% of the best
  wave efficiency (CTAs / (waves * slots)), keeping at least 2 key tiles per split. Under 8
  tiles nothing is split: the combine's fixed ~2.5 us outweighs what splitting saves there.
  (Measured on the H200, batch 1, d128: 2k keys 8.5 us at 16 splits against 9.9 at 8.)
  A contiguous cache counts one CTA an SM where that leaves every split at least
  DECODE_LONG_SPLIT_KEYS keys, else ctas_per_sm: half the splits of two an SM measured
  0.5-2.8% faster from 1k keys a split (batch 1 at 16k-64k, batch 2-8 at 8k-128k, d64 and
  d128), and 11% slower at 512 (batch 1, 8k keys: 16 splits against 32). A paged cache
  keeps two an SM: with one, page size 16 measured 1-2% slower (NOTES, session 22)."""
  units = batch * kv_heads * m_blocks
  tiles = -(-max_keys // block_n)
  most = max(1, min(DECODE_MAX_SPLITS, tiles // 2 if tiles >= 8 else 1))

  def fewest_filling(slots):
    def efficiency(splits):
      ctas = units * splits
      return ctas / (-(-ctas // slots) * slots)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.95 * best)

  if not paged:
    one_an_sm = fewest_filling(num_sms)
    if ctas_per_sm == 1 or max_keys >= DECODE_LONG_SPLIT_KEYS * one_an_sm:
      return one_an_sm
  return fewest_filling(num_sms * ctas_per_sm)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


# --- Abstract evaluation ------------------------------------------------------
# `aval.update` keeps the operands' sharding and varying manual axes.


def _fwd_abstract_eval(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  descale_q,
  descale_k,
  descale_v,
  *,
  return_max_logit,
  fp8,
  **params,
):
  del k, seqused_q, seqused_k, q_rows, kv_rows, sinks, descale_q, descale_k, descale_v, params
  batch, seqlen_q, heads, _ = q.shape
  spec_b, spec_t, spec_n, _ = q.sharding.spec
  lse_sharding = q.sharding.update(spec=jax.sharding.PartitionSpec(spec_b, spec_n, spec_t))
  results = (
    q.update(shape=(batch, seqlen_q, heads, v.shape[3]), dtype=_out_dtype(q, fp8)),
    q.update(shape=(batch, heads, seqlen_q), dtype=jnp.float32, sharding=lse_sharding),
  )
  if not return_max_logit:
    return results
  per_head = q.sharding.update(spec=jax.sharding.PartitionSpec(spec_b, spec_n))
  return (*results, q.update(shape=(batch, heads), dtype=jnp.float32, sharding=per_head))


def _bwd_abstract_eval(
  dout, q, k, v, out, lse, seqused_q, seqused_k, q_rows, kv_rows, sinks, **params
):
  del dout, out, lse, seqused_q, seqused_k, q_rows, kv_rows, params
  grads = (q.update(), k.update(), v.update())
  return (*grads, sinks.update()) if sinks.size else grads


# --- CUDA lowering -------------------------------------------------------------


def _out_dtype(q, fp8):
  return q.dtype if fp8 is None else jnp.dtype(fp8.out_dtype)


def _fwd_cuda(
  q,
  k,
  v,
  seqused_q,
  seqused_k,
  q_rows,
  kv_rows,
  sinks,
  descale_q,
  descale_k,
  descale_v,
  *,
  return_max_logit,
  fp8,
  **params,
):
  out_dtype = _out_dtype(q, fp8)
  dims = _kernel_head_dims("fwd", q, v, out_dtype)
  if dims is None:
    return reference.attention_fwd(
      q,
      k,
      v,
      seqused_q,
      seqused_k,
      q_rows,
      kv_rows,
      sinks,
      descale_q,
      descale_k,
      descale_v,
      return_max_logit=return_max_logit,
      fp8=fp8,
      **params,
    )
  head_dim, head_dim_v = dims
  if fp8 is not None:
    _check_descale_blocks(fp8, q, k, head_dim, descale_q, descale_k)
  batch, seqlen_q, heads, _ = q.shape
  tile_plan = absent_if_none(None)
  if q_rows.size:
    tile_plan = segment_kernels.forward_tiles(q_rows, *_segment_tile("fwd", q.dtype, head_dim))
  out, lse, _, max_logit_keys = jax.ffi.ffi_call(
    _kernels.FWD_TARGET,
    (
      jax.ShapeDtypeStruct((batch, seqlen_q, heads, head_dim_v), out_dtype),
      jax.ShapeDtypeStruct((batch, heads, seqlen_q), jnp.float32),
      jax.ShapeDtypeStruct((fwd_workspace_bytes(),), jnp.uint8),
      jax.ShapeDtypeStruct((batch, heads) if return_max_logit else (1,), jnp.uint32),
    ),
  )(
    _pad_head_dim(q, head_dim),
    _pad_head_dim(k, head_dim),
    _pad_head_dim(v, head_dim_v),
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    tile_plan,
    sinks,
    descale_q,
    descale_k,
    descale_v,
    **_ffi_attributes(**params),
    return_max_logit=bool(return_max_logit),
  )
  results = (out[..., : v.shape[3]], lse)
  return (*results, decode_max_logit(max_logit_keys)) if return_max_logit else results


def _check_descale_blocks(fp8, q, k, head_dim, descale_q, descale_k):
  """Descales with several blocks must be cut as the compiled kernel's tiles are."""
  kernel_rows = _kernels.kernels_available().descale_block(q.dtype, fp8.out_dtype, head_dim)
  for name, descale, seqlen, rows, kernel in (
    ("descale_q", descale_q, q.shape[1], fp8.q_block_rows, kernel_rows[0]),
    ("descale_k", descale_k, k.shape[1], fp8.k_block_rows, kernel_rows[1]),
  ):
    if descale.ndim == 3 and descale.shape[2] > 1 and rows != kernel:
      raise ValueError(
        f"jax_fa3: {name} has {descale.shape[2]} blocks of {rows} rows (of {seqlen}), but the "
        f"compiled float8_e4m3fn kernel for head_dim={head_dim} reads blocks of {kernel}; "
        f"quantize with jax_fa3.fp8_attention, or with "
        f"kernels_available().descale_block(...)"
      )


def decode_max_logit(keys):
  """The kernel's order-preserving uint32 keys (cuda/common/max_logit.h) as float32; key 0
  (no score recorded: every row of the head saw no key) is -inf."""
  negative = keys < jnp.uint32(0x80000000)
  bits = jnp.where(negative, ~keys, keys & jnp.uint32(0x7FFFFFFF))
  values = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(keys == 0, -jnp.inf, values)


def _bwd_cuda(dout, q, k, v, out, lse, seqused_q, seqused_k, q_rows, kv_rows, sinks, **params):
  dims = _kernel_head_dims("bwd", q, v)
  if dims is None:
    return reference.attention_bwd(
      dout, q, k, v, out, lse, seqused_q, seqused_k, q_rows, kv_rows, sinks, **params
    )
  head_dim, head_dim_v = dims
  query_tile_plan = key_block_plan = absent_if_none(None)
  if q_rows.size:
    query_tile_plan, key_block_plan = segment_kernels.backward_plans(
      q_rows, k.shape[1], *_segment_tile("bwd", q.dtype, head_dim)
    )
  batch, seqlen_q, heads, _ = q.shape
  _, seqlen_k, kv_heads, _ = k.shape
  workspace = bwd_workspace_bytes(
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v, sinks=bool(sinks.size)
  )
  dq, dk, dv, _, dsinks = jax.ffi.ffi_call(
    _kernels.BWD_TARGET,
    (
      jax.ShapeDtypeStruct((*q.shape[:3], head_dim), q.dtype),
      jax.ShapeDtypeStruct((*k.shape[:3], head_dim), k.dtype),
      jax.ShapeDtypeStruct((*v.shape[:3], head_dim_v), v.dtype),
      jax.ShapeDtypeStruct((workspace,), jnp.uint8),
      jax.ShapeDtypeStruct((batch, heads) if sinks.size else (1,), jnp.float32),
    ),
  )(
    _pad_head_dim(dout, head_dim_v),
    _pad_head_dim(q, head_dim),
    _pad_head_dim(k, head_dim),
    _pad_head_dim(v, head_dim_v),
    _pad_head_dim(out, head_dim_v),
    lse,
    seqused_q,
    seqused_k,
    q_rows,
    kv_rows,
    query_tile_plan,
    key_block_plan,
    sinks,
    **_ffi_attributes(**params),
  )
  grads = (dq[..., : q.shape[3]], dk[..., : k.shape[3]], dv[..., : v.shape[3]])
  return (*grads, dsinks) if sinks.size else grads


def _decode_cuda(
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
  num_splits,
):
  params = dict(
    softmax_scale=softmax_scale,
    softcap=softcap,
    window_left=window_left,
    window_right=window_right,
    num_splits=num_splits,
  )
  head_dim = q.shape[3]
  dims = _kernel_head_dims("decode", q, q) if head_dim % 8 == 0 else None
  if dims is None:
    if head_dim % 8:
      _warn_once(
        f"jax_fa3: the decode kernel needs a head_dim that is a multiple of 8, got "
        f"{head_dim}; running the float32 reference instead (slow)."
      )
    return reference.kvcache_attention(
      q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, **params
    )
  batch, seqlen_q, heads, _ = q.shape
  kv_heads = k_cache.shape[2]
  m_blocks = decode_m_blocks(heads, kv_heads, seqlen_q)
  if num_splits == 0:
    block_n, ctas_per_sm = _kernels.kernels_available().decode_shape(q.dtype, dims[0])
    capacity = k_cache.shape[1] * (page_table.shape[1] if page_table.size else 1)
    max_keys = capacity + (k_new.shape[1] if k_new.ndim == 4 else 0)
    num_splits = decode_num_splits(
      batch,
      kv_heads,
      m_blocks,
      max_keys,
      block_n,
      ctas_per_sm,
      _kernels.sm_count(),
      paged=bool(page_table.size),
    )
  workspace = decode_workspace_bytes(batch, kv_heads, m_blocks, num_splits, head_dim)
  out, lse, k_cache, v_cache, _ = jax.ffi.ffi_call(
    _kernels.DECODE_TARGET,
    (
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, seqlen_q), jnp.float32),
      jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
      jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
      jax.ShapeDtypeStruct((workspace,), jnp.uint8),
    ),
    input_output_aliases={1: 2, 2: 3},
  )(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    page_table,
    softmax_scale=np.float32(softmax_scale),
    softcap=np.float32(softcap),
    window_left=int(window_left),
    window_right=int(window_right),
    num_splits=int(num_splits),
  )
  return out, lse, k_cache, v_cache


def _segment_tile(direction, dtype, head_dim):
  """(block_m, block_n) of the packed-sequence kernel, for its plans (segment_kernels.py)."""
  return _kernels.kernels_available().segment_tile(direction, dtype, head_dim)


def _kernel_head_dims(direction, q, v, out_dtype=None):
  """The compiled head dims to pad to, or None (with a one-time warning) if none fits.

  Raises RuntimeError when the extension is missing altogether, and ValueError when kernels
  read q's dtype but none writes `out_dtype` (default: q's dtype).
  """
  kernels = _kernels.kernels_available()
  if not kernels:
    raise RuntimeError(f"jax_fa3 cannot lower to CUDA: {kernels.unavailable_reason}")
  other_gpus = _kernels.gpus_without_kernels()
  if other_gpus:  # e.g. an A100: sm_90a code cannot run there
    _warn_once(
      f"jax_fa3: the kernels are built for Hopper (sm_90a), not for "
      f"{', '.join(other_gpus)}; running the float32 reference instead (slow)."
    )
    return None
  out_dtype = q.dtype if out_dtype is None else jnp.dtype(out_dtype)
  written = kernels.out_dtypes(direction, q.dtype)
  if written and out_dtype.name not in written:
    raise ValueError(
      f"jax_fa3: out_dtype={out_dtype.name} has no compiled {direction} kernel "
      f"for {q.dtype} inputs; the compiled ones write {', '.join(written)}. "
      f"See jax_fa3.kernels_available()."
    )
  dims = kernels.head_dims_for(direction, q.dtype, q.shape[3], v.shape[3], out_dtype)
  if dims is None:
    _warn_once(
      f"jax_fa3: no {direction} kernel is compiled for {q.dtype} with "
      f"head_dim={q.shape[3]}, head_dim_v={v.shape[3]}; running the float32 "
      f"reference instead (slow). See jax_fa3.kernels_available()."
    )
  return dims


@functools.cache
def _warn_once(message):
  warnings.warn(message)


def _pad_head_dim(x, head_dim):
  """Zero-pads the last axis: zero q/k columns leave the scores, zero v columns the output, unchanged."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim - x.shape[-1])])


def _ffi_attributes(
  *, softmax_scale, softcap, window_left, window_right, diagonal_offset, deterministic=None
):
  """The FFI attributes, typed as CONTRACT.md says: f32 as np.float32, s64 as int, i1 as bool."""
  attributes = dict(
    softmax_scale=np.float32(softmax_scale),
    softcap=np.float32(softcap),
    window_left=int(window_left),
    window_right=int(window_right),
    diagonal_offset=int(diagonal_offset),
  )
  if deterministic is not None:
    attributes["deterministic"] = bool(deterministic)
  return attributes


def _decode_abstract_eval(q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table, **params):
  del cache_seqlens, k_new, v_new, page_table, params
  batch, seqlen_q, heads, _ = q.shape
  spec_b, spec_t, spec_n, _ = q.sharding.spec
  lse_sharding = q.sharding.update(spec=jax.sharding.PartitionSpec(spec_b, spec_n, spec_t))
  return (
    q.update(),
    q.update(shape=(batch, heads, seqlen_q), dtype=jnp.float32, sharding=lse_sharding),
    k_cache.update(),
    v_cache.update(),
  )


def _no_decode_gradient(primals, tangents, **params):
  raise NotImplementedError(
    "flash_attention_with_kvcache has no gradient: it is an inference op (KV-cache decode). "
    "Use jax_fa3.flash_attention for training."
  )


# --- Batching --------------------------------------------------------------------


def decode_batch(primitive, args, dims, **params):
  """vmap of decode, exactly (each mapped instance gets the results and caches it would get
  alone), by folding the mapped axis into the batch:
  - contiguous cache: every operand leads with the batch; unmapped ones are broadcast.
  - paged cache mapped (each instance its own pool `[n, num_pages, ...]`): the pools are
    concatenated into one of `n * num_pages` pages and instance i's page table offset by
    `i * num_pages` (an out-of-range entry stays out of range).
  - paged cache shared (not mapped) and nothing appended: every instance reads the one pool.
  - paged cache shared with k_new/v_new: an error: each instance would write its own copy of
    the pool. Map the pool, or fold the axis into the batch (one page table, one pool).
  """
  q, k_cache, v_cache, cache_seqlens, k_new, v_new, page_table = args
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  front = lambda x, d: batching.bdim_at_front(x, d, size)  # broadcasts an unmapped operand
  fold = lambda x: x.reshape(-1, *x.shape[2:])
  present = lambda x, rank, d: x.ndim == rank + (d is not None)  # absent: shape [0], unmapped
  operands = [fold(front(x, d)) for x, d in zip((q, cache_seqlens), (dims[0], dims[3]))]
  appends = present(k_new, 4, dims[4])
  new = [fold(front(x, d)) if appends else x for x, d in zip((k_new, v_new), dims[4:6])]
  paged = present(page_table, 2, dims[6])
  caches_mapped = dims[1] is not None or dims[2] is not None
  if not paged:
    caches = [fold(front(x, d)) for x, d in zip((k_cache, v_cache), dims[1:3])]
  elif caches_mapped:
    caches = [front(x, d) for x, d in zip((k_cache, v_cache), dims[1:3])]
    num_pages = caches[0].shape[1]
    caches = [fold(x) for x in caches]
    table = front(page_table, dims[6])
    offset = jnp.arange(size, dtype=jnp.int32)[:, None, None] * num_pages
    in_range = (table >= 0) & (table < num_pages)
    page_table = fold(jnp.where(in_range, table + offset, -1))
  elif appends:
    raise NotImplementedError(
      "vmap of flash_attention_with_kvcache: a paged k_cache/v_cache shared by the mapped "
      "instances (not mapped) cannot take k_new/v_new: each instance would write its own "
      "copy of the page pool. Map k_cache and v_cache too (one pool per instance), or fold "
      "the mapped axis into the batch yourself (one page table [n * batch, max_pages] into "
      "the one pool)."
    )
  else:
    caches = [k_cache, v_cache]
    page_table = fold(front(page_table, dims[6]))
  out, lse, k_cache, v_cache = primitive.bind(
    operands[0], *caches, operands[1], *new, page_table, **params
  )
  unfold = lambda x: x.reshape(size, -1, *x.shape[1:])
  results = [unfold(out), unfold(lse)]
  if caches_mapped or not paged:
    return results + [unfold(k_cache), unfold(v_cache)], [0, 0, 0, 0]
  return results + [k_cache, v_cache], [0, 0, None, None]


# --- Registration ----------------------------------------------------------------


fwd_p = define_primitive("fa3_fwd_local", _fwd_abstract_eval, reference.attention_fwd, _fwd_cuda)
bwd_p = define_primitive("fa3_bwd_local", _bwd_abstract_eval, reference.attention_bwd, _bwd_cuda)

# The decode primitive: its own batching rule (a paged cache is not batched by sequence) and
# a JVP that says there is no gradient.
decode_p = define_primitive(
  "fa3_decode_local",
  _decode_abstract_eval,
  reference.kvcache_attention,
  _decode_cuda,
  batcher=lambda p: functools.partial(decode_batch, p),
)
ad.primitive_jvps[decode_p] = _no_decode_gradient
