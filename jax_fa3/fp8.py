"""fp8_attention: attention on 16-bit inputs with an FP8 (e4m3) forward, differentiable.

The forward quantizes q, k and v (`jax_fa3.fp8_quantize.quantize_fp8`: one fused pass on
the GPU) and runs the FP8 forward kernel on them (attention.fp8_forward). FlashAttention-3's
two accuracy techniques are options:
- block quantization: each tile of rows gets its own scale, the query tile of the kernel
  for q (q_block_rows, 64 rows) and its key block for k (k_block_rows), so an outlier
  coarsens one tile, not the whole head;
- incoherent processing: q and k are both multiplied by one orthogonal matrix, the
  normalised Walsh-Hadamard transform after random signs, H = W diag(signs) / sqrt(d). The
  scores do not change (q H^T H k^T = q k^T), but an outlier is spread over all d
  coordinates, which shrinks the largest value a scale must cover.
v is quantized per (batch, kv head), without the transform: a per-key-block scale of v
would have to enter P·V inside each tile (P rescaled per block), and e4m3 keeps its
relative precision at any scale, so one scale per head loses only subnormal range.

Split k and v (`split_kv`, on by default where the head dim pads to 64): k and v are each
carried as two e4m3 terms at the same scale, the value and its rounding residual
(x'/descale = x8 + r8 to about 2^-8 relative), in the FP8 kernel of twice the head dim:
q8 twice, [q8, q8] . [k8, r8_k] = q8 . (k8 + r8_k), and P . [v8, r8_v], whose two halves of
the output are summed. That removes k's and v's rounding, two of the three large error
terms (q's rounding, the third, is left; P's is small). Measured on the paper's outliers
(benchmarks/NOTES.md, benchmarks/fp8_accuracy_findings.md): at head dim 64 the RMSE goes from 1.5e-2
to 9.2e-3, for the d128 kernel's time (about 1.45x the d64 kernel's at 4k tokens). At 128
and 256 the plain FP8 path is within 1e-2 already, and the doubled kernel (d256; none for
d512) would cost more, so it is off there.

The gradient: there is no FP8 backward. The backward is the 16-bit one (the bwd kernel)
on the dequantized inputs, in the transformed space (q H^T, k H^T and v, as the forward
saw them), with the FP8 forward's out and lse; dq and dk are mapped back by the
transform's transpose. It is the gradient of attention on the quantized inputs, with the
FP8 forward's rounding of P ignored (a straight-through estimate for the quantization).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_fa3 import _kernels, attention
from jax_fa3.primitives import AttentionParams, Fp8Params


@dataclasses.dataclass(frozen=True)
class _Quantization:
  """How fp8_attention quantizes: the inputs' dtype and head dims (q/k, v), the head dim
  they are padded to (a power of two, the transform's length), the rows per descale block
  of q and k (None: one scale per (batch, head)), the transform, whether k and v are split
  into two e4m3 terms (the kernel's head dim is then twice the padded one), and the FP8
  forward's parameters."""

  dtype: str
  head_dims: tuple[int, int]
  padded_head_dim: int
  q_block_rows: int | None
  k_block_rows: int | None
  hadamard: bool
  split_kv: bool
  fp8: Fp8Params


def fp8_attention(
  q,
  k,
  v,
  *,
  causal=False,
  window_size=(-1, -1),
  softcap=0.0,
  softmax_scale=None,
  hadamard=True,
  block_quantize=True,
  split_kv=None,
  return_lse=False,
):
  """Attention with an FP8 forward: `q`, `k`, `v` are quantized to float8_e4m3fn and the
  FP8 kernel runs on them; the output has the inputs' dtype. Differentiable.

  Args:
    q: `[batch, seqlen_q, heads, head_dim]`, bfloat16 or float16.
    k: `[batch, seqlen_k, kv_heads, head_dim]`, `heads % kv_heads == 0`; v:
      `[batch, seqlen_k, kv_heads, head_dim_v]`; the same dtype as q.
    causal, window_size, softcap, softmax_scale: as in `flash_attention` (causal aligned
      bottom-right when seqlen_q != seqlen_k).
    hadamard: multiply q and k by the same random-sign Walsh-Hadamard matrix before
      quantizing (incoherent processing): q·k is unchanged, outliers are spread out.
    block_quantize: one scale per tile of rows (64 query rows; the kernel's key block,
      `kernels_available().descale_block(...)`, 128 keys where no FP8 kernel is
      compiled); else one per (batch, head).
    split_kv: carry k and v as two e4m3 terms each (the value and its rounding residual)
      in the FP8 kernel of twice the (padded) head dim, which removes their rounding
      error; None (default): on where the head dim pads to 64, the one head dim where
      FP8 is otherwise above 1e-2 RMSE on the paper's outliers (1.5e-2 -> 9.2e-3), at the
      d128 kernel's cost (about 1.45x the d64 kernel's time). Head dims up to 128 only
      (there is no kernel above 256).
    return_lse: also return the lse, float32 `[batch, heads, seqlen_q]` (differentiable).

  Head dims up to 256 are zero-padded to 64, 128 or 256 (the transform needs a power of
  two; zero columns change neither the scores nor the output). v always gets one scale per
  (batch, kv head) and no transform (see the module docstring).

  Gradient: the bfloat16/float16 backward kernel on the dequantized inputs (in the
  transformed space), with this forward's out and lse; dq and dk are mapped back through
  the transform's transpose. It differentiates attention on the quantized values and
  ignores the rounding of the probabilities to e4m3 in the forward.

  Returns:
    `out [batch, seqlen_q, heads, head_dim_v]` in q's dtype, and `lse` with `return_lse`.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if attention._check_qkv(q, k, v, "fp8_attention"):  # pylint: disable=protected-access
    raise TypeError(
      "fp8_attention takes bfloat16 or float16 q, k and v and quantizes them "
      "itself; for float8_e4m3fn inputs with descale factors use "
      "jax_fa3.flash_attention(q8, k8, v8, descale_q=..., ...)"
    )
  causal, hadamard, block_quantize, return_lse = attention._check_flags(  # pylint: disable=protected-access
    causal=causal, hadamard=hadamard, block_quantize=block_quantize, return_lse=return_lse
  )
  if split_kv is not None:
    (split_kv,) = attention._check_flags(split_kv=split_kv)  # pylint: disable=protected-access
  params = attention._flash_params(  # pylint: disable=protected-access
    q.shape[3], softmax_scale, causal, window_size, softcap, diagonal_offset=k.shape[1] - q.shape[1]
  )
  quantization = _quantization(
    q.dtype, (q.shape[3], v.shape[3]), hadamard, block_quantize, split_kv
  )
  out, lse = _fp8_attention(q, k, v, params, quantization)
  return (out, lse) if return_lse else out


# The largest padded head dim split_kv takes: the kernel then runs at twice it, and the
# FP8 kernels go up to 256.
_SPLIT_MAX_HEAD_DIM = 128


def _quantization(dtype, head_dims, hadamard, block_quantize, split_kv=None) -> _Quantization:
  kernels = _kernels.kernels_available()
  written = kernels.out_dtypes("fwd", attention.FP8_DTYPE)
  # The FP8 kernels write bfloat16 (float16 where compiled); the reference path writes both.
  out_dtype = jnp.dtype(dtype).name
  if written and out_dtype not in written:
    out_dtype = "bfloat16"
  padded = max(64, 1 << (max(head_dims) - 1).bit_length())
  if split_kv is None:
    split_kv = padded == 64
  elif split_kv and padded > _SPLIT_MAX_HEAD_DIM:
    raise ValueError(
      f"fp8_attention: split_kv runs the FP8 kernel of twice the head dim, so it takes "
      f"head dims up to {_SPLIT_MAX_HEAD_DIM}; got head dims {head_dims} (padded to {padded})"
    )
  kernel_head_dim = 2 * padded if split_kv else padded
  q_block_rows, k_block_rows = kernels.descale_block(
    attention.FP8_DTYPE, out_dtype, kernel_head_dim
  )
  fp8 = Fp8Params(out_dtype, q_block_rows, k_block_rows)
  if not block_quantize:
    q_block_rows = k_block_rows = None
  return _Quantization(
    jnp.dtype(dtype).name,
    head_dims,
    padded,
    q_block_rows,
    k_block_rows,
    hadamard,
    split_kv,
    fp8,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_attention(q, k, v, params, quantization):
  return _forward(q, k, v, params, quantization)[0]


def _forward(q, k, v, params: AttentionParams, quantization: _Quantization):
  from jax_fa3 import fp8_quantize  # pylint: disable=import-outside-toplevel

  signs = _signs(quantization)
  pad = functools.partial(_pad_head_dim, head_dim=quantization.padded_head_dim)
  q8, descale_q = fp8_quantize.quantize_fp8(
    pad(q), block_rows=quantization.q_block_rows, signs=signs
  )
  k8, descale_k = fp8_quantize.quantize_fp8(
    pad(k), block_rows=quantization.k_block_rows, signs=signs
  )
  v8, descale_v = fp8_quantize.quantize_fp8(pad(v), block_rows=None)
  descale_v = descale_v[:, :, 0]
  q_operand = q8
  if quantization.split_kv:
    # [q8, q8] . [k8, r8_k] = q8 . (k8 + r8_k); P . [v8, r8_v]: the output's halves add up.
    q_operand = jnp.concatenate([q8, q8], axis=3)
    k8 = _with_residual(pad(k), k8, descale_k, quantization.k_block_rows, signs)
    v8 = _with_residual(pad(v), v8, descale_v[..., None], None, None)
  out, lse = attention.fp8_forward(
    q_operand,
    k8,
    v8,
    (descale_q, descale_k, descale_v),
    jnp.zeros((0,), jnp.float32),
    params,
    quantization.fp8,
  )
  if quantization.split_kv:
    half = quantization.padded_head_dim
    out = out[..., :half].astype(jnp.float32) + out[..., half:].astype(jnp.float32)
  out = out[..., : v.shape[3]].astype(q.dtype)
  quantized = (q8, k8, v8, descale_q, descale_k, descale_v)
  return (out, lse), (quantized, out, lse)


def _fp8_attention_fwd(q, k, v, params, quantization):
  return _forward(q.value, k.value, v.value, params, quantization)


def _fp8_attention_bwd(params, quantization, residuals, cotangents):
  (q8, k8, v8, descale_q, descale_k, descale_v), out, lse = residuals
  dtype = quantization.dtype
  head_dim, head_dim_v = quantization.head_dims
  padded = quantization.padded_head_dim
  q = _dequantize(q8, descale_q, quantization.q_block_rows, dtype, padded)
  k = _dequantize(k8, descale_k, quantization.k_block_rows, dtype, padded)
  v = _dequantize(v8, descale_v[..., None], None, dtype, padded)[..., :head_dim_v]
  absent = jnp.zeros((0,), jnp.int32)
  dq, dk, dv, *_ = attention._attention_bwd(  # pylint: disable=protected-access
    params,
    False,
    False,
    "auto",
    (q, k, v, [absent] * 4, jnp.zeros((0,), jnp.float32), out, lse),
    cotangents,
  )
  signs = _signs(quantization)
  dq, dk = (_untransform(g, signs)[..., :head_dim].astype(dtype) for g in (dq, dk))
  return dq, dk, dv.astype(dtype)


_fp8_attention.defvjp(_fp8_attention_fwd, _fp8_attention_bwd, symbolic_zeros=True)


def _signs(quantization):
  if not quantization.hadamard:
    return None
  from jax_fa3 import fp8_quantize  # pylint: disable=import-outside-toplevel

  return fp8_quantize.random_signs(quantization.padded_head_dim)


def _with_residual(x, x8, descale, block_rows, signs):
  """[x8, r8] along the head dim: r8 the e4m3 rounding of what x8 missed, at x8's scale,
  x'/descale - x8 (x' = x rotated by `signs`, or x). x8 * descale + r8 * descale then holds
  x' to about 2^-8 relative (e4m3's 2^-4 twice). A separate step after quantize_fp8, which
  stays as it is (its CUDA kernel agrees with its XLA ops bit for bit)."""
  from jax_fa3 import fp8_quantize  # pylint: disable=import-outside-toplevel

  rotated = x.astype(jnp.float32) if signs is None else hadamard_transform(x, signs)
  residual = rotated / _per_row(descale, block_rows, x.shape[1]) - x8.astype(jnp.float32)
  residual = jnp.clip(residual, -fp8_quantize.E4M3_MAX, fp8_quantize.E4M3_MAX)
  r8 = fp8_quantize._round_to_e4m3(residual).astype(x8.dtype)  # pylint: disable=protected-access
  return jnp.concatenate([x8, r8], axis=3)


def _per_row(descale, block_rows, seqlen):
  """descale [B, H, blocks] as the factor of each row, [B, S, H, 1] (a block covers
  `block_rows` rows; None: one block)."""
  if block_rows is None:
    per_row = jnp.broadcast_to(descale, (*descale.shape[:2], seqlen))
  else:
    per_row = jnp.repeat(descale, block_rows, axis=2)[:, :, :seqlen]
  return jnp.swapaxes(per_row, 1, 2)[..., None]


def _pad_head_dim(x, head_dim):
  return jnp.pad(x, [(0, 0)] * 3 + [(0, head_dim - x.shape[3])])


def _dequantize(x8, descale, block_rows, dtype, head_dim):
  """x8 [B, S, H, D] times its descale [B, H, blocks] (a block covers `block_rows` rows;
  None: one block), in `dtype`; x8 of twice `head_dim` (split_kv) holds the value and its
  residual, which add up."""
  x = x8.astype(jnp.float32)
  if x.shape[3] != head_dim:
    x = x[..., :head_dim] + x[..., head_dim:]
  return (x * _per_row(descale, block_rows, x8.shape[1])).astype(dtype)


def hadamard_transform(x, signs):
  """x H^T = WHT(x * signs) / sqrt(d) along the last axis (a power of two d), in float32:
  the rotation fp8_quantize.quantize_fp8 applies with `signs`. W is the Walsh-Hadamard
  matrix in Sylvester (natural) order, W_2n = [[W_n, W_n], [W_n, -W_n]]."""
  return _walsh_hadamard(x.astype(jnp.float32) * signs) / np.sqrt(x.shape[-1])


def _untransform(x, signs):
  """The transpose of hadamard_transform (its inverse): signs * WHT(x) / sqrt(d); the
  identity without the transform (`signs` None). In float32."""
  x = x.astype(jnp.float32)
  if signs is None:
    return x
  return signs * _walsh_hadamard(x) / np.sqrt(x.shape[-1])


def _walsh_hadamard(x):
  """The unnormalised Walsh-Hadamard transform along the last axis, in log2(d) butterfly
  steps: each step pairs entries `half` apart within blocks of 2 * half."""
  *lead, d = x.shape
  half = 1
  while half < d:
    pairs = x.reshape(*lead, d // (2 * half), 2, half)
    x = jnp.stack(
      [pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], axis=-2
    ).reshape(*lead, d)
    half *= 2
  return x
