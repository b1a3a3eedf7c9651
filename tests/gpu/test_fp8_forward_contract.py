"""The FP8 forward kernel through its FFI target (cuda/ffi/CONTRACT.md), without the Python
layer: e4m3 q, k, v with descale factors in every accepted shape, against a float32 oracle on
the dequantized inputs.

Accuracy rule, adapted to FP8: the kernel rounds the probabilities to e4m3 before P·V (3
mantissa bits), which dominates its error. The baseline is the same attention in float32 with
P rounded to e4m3 the way the contract says (exp2 offset by 8, final row max) and the output
rounded to bfloat16; the kernel's error must be at most twice the baseline's, plus 1e-5.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_ffi

E4M3 = jnp.float8_e4m3fn


def _fp8_dims():
    return sorted(d for dtype, d in kernel_ffi.compiled("fwd") if dtype == "float8_e4m3fn")


def _key_block(head_dim):
    blocks = {int(d): int(k_rows) for (_, _, d, _, k_rows) in kernel_ffi.extension().descale_blocks()}
    return blocks[head_dim]


@dataclasses.dataclass(frozen=True)
class Case:
    head_dim: int
    batch: int = 2
    seqlen_q: int = 333
    seqlen_k: int = 517
    heads: int = 4
    kv_heads: int = 2
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    descales: str = "none"  # none | head | block

    def offset(self):
        return self.seqlen_k - self.seqlen_q  # bottom-right alignment

    def mask_window(self):
        return (self.window[0], 0) if self.causal else self.window


CASES = [Case(d, descales=s) for d in (64, 128, 256) for s in ("none", "head", "block")] + [
    Case(128, causal=True, descales="block"),
    Case(128, seqlen_q=517, seqlen_k=333, causal=True, descales="block"),  # rows with no key
    Case(64, causal=True, window=(100, -1), descales="head"),
    Case(256, window=(64, 64), softcap=30.0, descales="block"),
    Case(128, heads=8, kv_heads=1, seqlen_q=1, seqlen_k=4099, descales="block"),
    Case(64, batch=3, seqlen_q=2048, seqlen_k=2048, heads=2, kv_heads=2, causal=True),
    Case(256, seqlen_q=1000, seqlen_k=3000, heads=3, kv_heads=3, descales="block"),
]


def _inputs(case, seed):
    rng = np.random.default_rng(seed)
    b, sq, sk, h, hk, d = case.batch, case.seqlen_q, case.seqlen_k, case.heads, case.kv_heads, case.head_dim
    q = jnp.asarray(rng.standard_normal((b, sq, h, d)) * 2, E4M3)
    k = jnp.asarray(rng.standard_normal((b, sk, hk, d)) * 2, E4M3)
    v = jnp.asarray(rng.standard_normal((b, sk, hk, d)) * 2, E4M3)
    if case.descales == "none":
        return q, k, v, {}, (np.ones((b, h, 1)), np.ones((b, hk, 1)), np.ones((b, hk)))
    q_blocks = 1 if case.descales == "head" else -(-sq // 64)
    k_blocks = 1 if case.descales == "head" else -(-sk // _key_block(d))
    dq = rng.uniform(0.02, 0.2, (b, h, q_blocks)).astype(np.float32)
    dk = rng.uniform(0.02, 0.2, (b, hk, k_blocks)).astype(np.float32)
    dv = rng.uniform(0.5, 2.0, (b, hk)).astype(np.float32)
    return q, k, v, dict(descale_q=dq, descale_k=dk, descale_v=dv), (dq, dk, dv)


def _oracle(case, q, k, v, descales, round_p):
    """float32 attention on the dequantized inputs; round_p: P to e4m3 as the contract says."""
    dq, dk, dv = (np.asarray(x, np.float32) for x in descales)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    q_rows = np.repeat(dq, 64, axis=2)[:, :, :sq] if dq.shape[2] > 1 else np.broadcast_to(dq, (b, h, sq))
    block = _key_block(d)
    k_keys = np.repeat(dk, block, axis=2)[:, :, :sk] if dk.shape[2] > 1 else np.broadcast_to(dk, (b, hk, sk))
    qf, kf, vf = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    kf, vf = jnp.repeat(kf, group, axis=2), jnp.repeat(vf, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST)
    s = s * q_rows[..., None] * jnp.repeat(k_keys, group, axis=1)[:, :, None, :] / math.sqrt(d)
    if case.softcap:
        s = case.softcap * jnp.tanh(s / case.softcap)
    ok = kernel_ffi.visible_mask(sq, sk, case.mask_window(), case.offset(), None, None, b)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.exp(s - m) * 256.0
    l = jnp.sum(p, axis=-1, keepdims=True)
    if round_p:
        p = p.astype(E4M3).astype(jnp.float32)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=jax.lax.Precision.HIGHEST)
    o = o / jnp.transpose(jnp.where(l > 0, l, 1), (0, 2, 1, 3)) * jnp.repeat(dv, group, axis=1)[:, None, :, None]
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1) / 256.0) + m[..., 0], -jnp.inf)
    return np.asarray(o, np.float32), np.asarray(lse, np.float32)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp8_forward_matches_oracle(case):
    if case.head_dim not in _fp8_dims():
        pytest.fail(f"FP8 forward d{case.head_dim} not compiled")
    q, k, v, descale_args, descales = _inputs(case, seed=hash(str(case)) % 2**31)
    out, lse = jax.jit(lambda q, k, v, **dsc: kernel_ffi.fwd(
        q, k, v, softmax_scale=1 / math.sqrt(case.head_dim), softcap=case.softcap, window=case.mask_window(),
        diagonal_offset=case.offset(), **dsc))(q, k, v, **descale_args)
    assert out.dtype == jnp.bfloat16
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    ref, ref_lse = _oracle(case, q, k, v, descales, round_p=False)
    base, _ = _oracle(case, q, k, v, descales, round_p=True)
    base = np.asarray(jnp.asarray(base).astype(jnp.bfloat16), np.float32)
    assert not np.isnan(out).any(), "unwritten or NaN output elements"
    assert not np.isnan(lse).any(), "unwritten or NaN LSE elements"
    empty = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty), "LSE -inf rows differ from the oracle's empty rows"
    assert np.all(out[np.transpose(empty, (0, 2, 1))] == 0), "rows with no visible key must be exactly 0"
    err, base_err = np.max(np.abs(out - ref)), np.max(np.abs(base - ref))
    assert err <= 2 * base_err + 1e-5, f"out error {err:.3e} > 2 x baseline {base_err:.3e} + 1e-5"
    if (~empty).any():
        lse_err = np.max(np.abs(lse[~empty] - ref_lse[~empty]))
        scale = float(np.max(descales[0])) * float(np.max(descales[1])) / math.sqrt(case.head_dim)
        tol = kernel_ffi.fp8_lse_tolerance(q, k, scale, case.softcap)
        assert lse_err <= tol, f"lse error {lse_err:.3e} > {tol:.3e}"


def test_fp8_descale_shapes_are_checked():
    q = jnp.zeros((1, 64, 2, 128), E4M3)
    call = lambda *args, **kwargs: jax.block_until_ready(kernel_ffi.fwd(*args, softmax_scale=0.1, **kwargs))
    with pytest.raises(Exception, match="descale_k must be float32"):
        call(q, q, q, descale_k=np.ones((1, 2, 5), np.float32))
    with pytest.raises(Exception, match="descale_q must be float32"):
        call(q, q, q, descale_q=np.ones((1, 1, 1), np.float32))
    bf = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    with pytest.raises(Exception, match="for float8_e4m3fn inputs only"):
        call(bf, bf, bf, descale_v=np.ones((1, 2), np.float32))
