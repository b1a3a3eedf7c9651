"""One-off device probe (not committed): FP8 forward kernel time vs bf16 kernel and cuDNN FP8."""
import math, sys, time
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "tests/gpu")
import jax, jax.numpy as jnp, numpy as np
import kernel_ffi
from timing import time_ms

def flops(b, h, s, d, causal):
  pairs = s * (s + 1) / 2 if causal else s * s
  return 4 * b * h * d * pairs

rows = []
for d in [int(x) for x in (sys.argv[1].split(",") if len(sys.argv) > 1 else ["64", "128", "256"])]:
  h = 16 if d <= 128 else 8
  for s in (2048, 8192, 16384):
    b = max(1, 16384 // s)
    for causal in (False, True):
      key = jax.random.split(jax.random.key(s + d), 3)
      q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in key)
      q8, k8, v8 = (x.astype(jnp.float8_e4m3fn) for x in (q, k, v))
      kw = dict(softmax_scale=1 / math.sqrt(d), window=(-1, 0) if causal else (-1, -1), diagonal_offset=0)
      f8 = jax.jit(lambda q, k, v: kernel_ffi.fwd(q, k, v, **kw))
      f16 = jax.jit(lambda q, k, v: kernel_ffi.fwd(q, k, v, **kw)) if False else None
      t8 = time_ms(f8, q8, k8, v8)
      tc = float("nan")
      try:
        from jax._src.cudnn import fused_attention_stablehlo as fas
        params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in fas.fp8_params_keys}
        fc = jax.jit(lambda q, k, v: fas.dot_product_attention(q, k, v, fp8_params=params,
            scale=1 / math.sqrt(d), mask_type=fas.MaskType.CAUSAL if causal else fas.MaskType.NO_MASK,
            use_fp8=True, qkv_layout="BTNH")[0])
        tc = time_ms(fc, q8, k8, v8)
      except Exception as e:
        if d == 64 and s == 2048 and not causal: print("cudnn fp8:", type(e).__name__, str(e)[:300])
      fl = flops(b, h, s, d, causal)
      print(f"d{d} s{s} causal={causal}: fp8 {fl / t8 / 1e9:7.1f} TFLOP/s ({t8:.3f} ms)  cudnn_fp8 {fl / tc / 1e9:7.1f}", flush=True)
