"""The CUDA lowering, read as StableHLO text on a CPU-only machine with a faked variant table."""

import jax
import jax.numpy as jnp
import pytest

import jax_fa3
from jax_fa3 import _kernels, primitives
from jax_fa3._kernels import KernelStatus, Variant

VARIANTS = tuple(
  Variant(direction, "bfloat16", "bfloat16", d, d)
  for direction in ("fwd", "bwd")
  for d in (64, 96, 128, 256)
)
# The packed-sequence kernels' tiles, as the extension would report them.
SEGMENT_TILES = {("fwd", "bfloat16", d): (128, 128) for d in (64, 96, 128, 256)} | {
  ("bwd", "bfloat16", d): (64, 128) for d in (64, 96, 128, 256)
}


@pytest.fixture
def compiled(monkeypatch):
  """Pretends the extension holds the given variants (default: VARIANTS)."""

  def install(variants=VARIANTS, reason=None, targets=frozenset()):
    status = KernelStatus(
      tuple(variants), reason, segment_tiles=SEGMENT_TILES, targets=frozenset(targets)
    )
    monkeypatch.setattr(_kernels, "_status", status)

  install()
  return install


def cuda_text(fn, *args, platforms=("cuda",)):
  # A fresh function each time: jax caches lowerings, and the faked table changes between tests.
  return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=platforms).as_text()


def custom_calls(text, target):
  """The custom_call lines for `target`."""
  return [line for line in text.splitlines() if f"stablehlo.custom_call @{target}(" in line]


def grads(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))


def arrays(
  batch=2, seqlen_q=100, seqlen_k=130, heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16
):
  return (
    jnp.zeros((batch, seqlen_q, heads, head_dim), dtype),
    jnp.zeros((batch, seqlen_k, kv_heads, head_dim), dtype),
    jnp.zeros((batch, seqlen_k, kv_heads, head_dim), dtype),
  )


def test_forward_and_backward_call_the_ffi_targets(compiled):
  fn = lambda q, k, v: jax_fa3.flash_attention(
    q, k, v, causal=True, window_size=(32, 7), softcap=20.0, softmax_scale=0.25, deterministic=True
  )
  text = cuda_text(grads(fn), *arrays())
  (fwd,), (bwd,) = custom_calls(text, "jax_fa3_fwd"), custom_calls(text, "jax_fa3_bwd")
  attributes = (
    "softmax_scale = 2.500000e-01 : f32",
    "softcap = 2.000000e+01 : f32",
    "window_left = 32 : i64",
    "window_right = 0 : i64",
    "diagonal_offset = 30 : i64",
  )
  for call in (fwd, bwd):
    for attribute in attributes:
      assert attribute in call
  assert "deterministic = true" in bwd and "deterministic" not in fwd
  assert "return_max_logit = false" in fwd and "return_max_logit" not in bwd
  # The max_logit and dsinks results, not asked for, are one untouched word each.
  assert (
    "-> (tensor<2x100x4x64xbf16>, tensor<2x4x100xf32>, tensor<256xui8>, tensor<1xui32>)"
  ) in fwd
  workspace = primitives.bwd_workspace_bytes(2, 100, 130, 4, 2, 64, 64)
  assert (
    f"-> (tensor<2x100x4x64xbf16>, tensor<2x130x2x64xbf16>, tensor<2x130x2x64xbf16>, "
    f"tensor<{workspace}xui8>, tensor<1xf32>)"
  ) in bwd


def test_sinks_and_max_logit_are_operands_and_results(compiled):
  """sinks [B, H] float32 after the plans; max_logit [B, H] uint32 keys, dsinks [B, H]."""
  q, k, v = arrays()
  sinks = jnp.zeros((4,), jnp.float32)
  fn = lambda q, k, v, s: jax_fa3.flash_attention(
    q, k, v, causal=True, sinks=s, return_max_logit=True
  )[0]
  text = cuda_text(
    jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3)), q, k, v, sinks
  )
  (fwd,), (bwd,) = custom_calls(text, "jax_fa3_fwd"), custom_calls(text, "jax_fa3_bwd")
  assert (
    "tensor<0xi32>, tensor<2x4xf32>, tensor<0xf32>, tensor<0xf32>, tensor<0xf32>)" in fwd
  )  # sinks, then absent descales
  assert "return_max_logit = true" in fwd
  assert "tensor<256xui8>, tensor<2x4xui32>)" in fwd
  workspace = primitives.bwd_workspace_bytes(2, 100, 130, 4, 2, 64, 64, sinks=True)
  assert workspace > primitives.bwd_workspace_bytes(2, 100, 130, 4, 2, 64, 64)
  assert "tensor<0xi32>, tensor<2x4xf32>)" in bwd
  assert f"tensor<{workspace}xui8>, tensor<2x4xf32>)" in bwd


def test_operands_follow_the_contract(compiled):
  """q, k, v, then the seqused arrays: [B] int32 when given, [0] when absent; then the
  packed-sequence rows and plan, sinks and the three FP8 descales, absent."""
  q, k, v = arrays(seqlen_k=100, kv_heads=4)
  lengths = jnp.array([60, 100], jnp.int32)
  text = cuda_text(
    lambda q, k, v: jax_fa3.dot_product_attention(
      q, k, v, is_causal=True, query_seq_lengths=lengths
    ),
    q,
    k,
    v,
  )
  (fwd,) = custom_calls(text, "jax_fa3_fwd")
  assert (
    "(tensor<2x100x4x64xbf16>, tensor<2x100x4x64xbf16>, tensor<2x100x4x64xbf16>, "
    "tensor<2xi32>, tensor<0xi32>, tensor<0xi32>, tensor<0xi32>, tensor<0xi32>, "
    "tensor<0xf32>, tensor<0xf32>, tensor<0xf32>, tensor<0xf32>)"
  ) in fwd
  assert "diagonal_offset = 0 : i64" in fwd and "window_right = 0 : i64" in fwd


def test_segment_ids_pass_rows_and_plans_for_the_kernels_tiles(compiled):
  """Packed sequences: the rows [B, S, 4] and the plans for the reported tiles, no seqused."""
  q, k, v = arrays(seqlen_k=100, kv_heads=4)
  ids = jnp.zeros((2, 100), jnp.int32)
  text = cuda_text(
    grads(lambda q, k, v: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True)), q, k, v
  )
  (fwd,), (bwd,) = custom_calls(text, "jax_fa3_fwd"), custom_calls(text, "jax_fa3_bwd")
  assert (
    "tensor<0xi32>, tensor<0xi32>, tensor<2x100x4xi32>, tensor<2x100x4xi32>, "
    "tensor<9x8xi32>, tensor<0xf32>, tensor<0xf32>, tensor<0xf32>, tensor<0xf32>)"
  ) in fwd  # the tile list: a count, then room for 3 * ceil(100 / 128) + 1 tiles per row
  assert (
    "tensor<0xi32>, tensor<0xi32>, tensor<2x100x4xi32>, tensor<2x100x4xi32>, "
    "tensor<2x2x4xi32>, tensor<2x1x2xi32>, tensor<0xf32>)"
  ) in bwd  # two 64-row tiles, one 128-key block


PLAN_TARGETS = (
  _kernels.SEGMENT_ROWS_TARGET,
  _kernels.FORWARD_TILES_TARGET,
  _kernels.BACKWARD_PLANS_TARGET,
)


@pytest.mark.parametrize("with_plan_kernels", [False, True])
def test_segment_plans_come_from_their_kernels_when_compiled(compiled, with_plan_kernels):
  """With the plan targets in the extension, the rows and plans are one custom call each,
  of the shapes the attention calls take; without them, XLA builds them (no such call)."""
  compiled(targets=PLAN_TARGETS if with_plan_kernels else ())
  q, k, v = arrays(seqlen_k=100, kv_heads=4)
  ids = jnp.zeros((2, 100), jnp.int32)
  text = cuda_text(
    grads(lambda q, k, v: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True)), q, k, v
  )
  calls = {target: custom_calls(text, target) for target in PLAN_TARGETS}
  if not with_plan_kernels:
    assert not any(calls.values())
    return
  (rows,), (tiles,), (plans,) = calls.values()
  assert "-> (tensor<2x100x4xi32>, tensor<2x100x4xi32>, tensor<" in rows
  assert "window_left = -1 : i64" in rows and "window_right = 0 : i64" in rows
  assert "(tensor<2x100x4xi32>) -> (tensor<9x8xi32>, tensor<" in tiles
  assert "block_m = 128 : i64" in tiles and "block_n = 128 : i64" in tiles
  assert "(tensor<2x100x4xi32>) -> (tensor<2x2x4xi32>, tensor<2x1x2xi32>, tensor<" in plans


def test_head_dims_pad_to_the_next_compiled_one(compiled):
  """head_dim 80 runs the 96 kernel on zero-padded operands; the scale stays 1/sqrt(80)."""
  text = cuda_text(grads(jax_fa3.flash_attention), *arrays(head_dim=80))
  (fwd,), (bwd,) = custom_calls(text, "jax_fa3_fwd"), custom_calls(text, "jax_fa3_bwd")
  assert "(tensor<2x100x4x96xbf16>, tensor<2x130x2x96xbf16>, tensor<2x130x2x96xbf16>," in fwd
  assert "softmax_scale = 0.111803398 : f32" in fwd
  assert "tensor<2x100x4x96xbf16>, tensor<2x130x2x96xbf16>, tensor<2x130x2x96xbf16>" in bwd


def test_missing_backward_kernel_runs_the_reference_with_one_warning(compiled):
  compiled([v for v in VARIANTS if v.direction == "fwd"])
  primitives._warn_once.cache_clear()
  with pytest.warns(UserWarning, match="no bwd kernel is compiled for bfloat16") as record:
    text = cuda_text(grads(jax_fa3.flash_attention), *arrays())
    cuda_text(grads(jax_fa3.flash_attention), *arrays(batch=3))
  assert len([w for w in record if "no bwd kernel" in str(w.message)]) == 1
  assert custom_calls(text, "jax_fa3_fwd") and not custom_calls(text, "jax_fa3_bwd")


def test_dtype_without_kernels_runs_the_reference(compiled):
  primitives._warn_once.cache_clear()
  with pytest.warns(UserWarning, match="no fwd kernel is compiled for float16"):
    text = cuda_text(jax_fa3.flash_attention, *arrays(dtype=jnp.float16))
  assert "stablehlo.custom_call" not in text


def test_missing_extension_is_an_error_naming_why(compiled):
  compiled((), reason="No module named 'jax_fa3._fa3_cuda'")
  with pytest.raises(RuntimeError, match="cannot lower to CUDA.*No module named"):
    cuda_text(jax_fa3.flash_attention, *arrays())


def test_cuda_and_cpu_in_one_module(compiled):
  text = cuda_text(jax_fa3.flash_attention, *arrays(), platforms=("cuda", "cpu"))
  assert len(custom_calls(text, "jax_fa3_fwd")) == 1


def test_workspace_sizes():
  assert primitives.fwd_workspace_bytes() == 256
  # MHA, B=1, H=2, Sq=Sk=128, D=Dv=64: dq accumulator 65536 + dPsum 1024 + lse 1024
  # + semaphores 16 -> 256.
  assert primitives.bwd_workspace_bytes(1, 128, 128, 2, 2, 64, 64) == 65536 + 1024 + 1024 + 256
  # GQA, B=2, H=8, Hk=2, Sq=100->128, Sk=300->384, D=80->128, Dv=64: adds the f32 dk and dv
  # accumulators, 786432 and 393216, and their semaphores, 96 -> 256.
  assert primitives.bwd_workspace_bytes(2, 100, 300, 8, 2, 80, 64) == (
    1048576 + 8192 + 8192 + 256 + 786432 + 393216 + 256
  )


def test_kernels_available_reports_why_not(compiled):
  compiled((), reason="No module named 'jax_fa3._fa3_cuda'")
  status = jax_fa3.kernels_available()
  assert not status and "No module named" in str(status)
  compiled()
  status = jax_fa3.kernels_available()
  assert status and "fwd bfloat16 head_dim=128 head_dim_v=128" in str(status)


def test_smallest_compiled_head_dims():
  status = KernelStatus(
    tuple(
      Variant("fwd", "bfloat16", "bfloat16", *dims) for dims in ((64, 64), (192, 128), (256, 256))
    )
  )
  assert status.head_dims_for("fwd", jnp.bfloat16, 64, 64) == (64, 64)
  assert status.head_dims_for("fwd", jnp.bfloat16, 100, 100) == (192, 128)
  assert status.head_dims_for("fwd", jnp.bfloat16, 100, 200) == (256, 256)
  assert status.head_dims_for("bwd", jnp.bfloat16, 64, 64) is None
  assert status.head_dims_for("fwd", jnp.float16, 64, 64) is None


def test_a_gpu_the_kernels_cannot_run_on_lowers_to_the_reference(compiled, monkeypatch):
  """On a non-Hopper GPU (say an A100) the sm_90a kernels cannot run: the reference path."""
  monkeypatch.setattr(
    _kernels, "gpus_without_kernels", lambda: ["NVIDIA A100 (compute capability 8.0)"]
  )
  primitives._warn_once.cache_clear()
  with pytest.warns(UserWarning, match="built for Hopper"):
    text = cuda_text(grads(jax_fa3.flash_attention), *arrays())
  assert not custom_calls(text, "jax_fa3_fwd") and not custom_calls(text, "jax_fa3_bwd")
