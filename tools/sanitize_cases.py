"""Small kernel calls for compute-sanitizer (memcheck, racecheck): the FFI targets alone,
no XLA oracle, so the sanitizer's slowdown is spent on our kernels. Exits non-zero if an
output has NaN (outputs are poisoned before each launch)."""

import math
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
os.environ["JAX_FA3_DEBUG_POISON"] = "1"  # forced: the NaN check below relies on it
import kernel_ffi  # noqa: E402

# (dtype, head_dim, batch, seqlen_q, seqlen_k, heads, kv_heads, window, seqused, softcap); the
# softcap cases run the kernels compiled with it (the backward's SoftcapMode::kOn).
CASES = [
  ("bfloat16", 128, 1, 7, 7, 2, 1, (-1, 0), False, 0.0),
  ("bfloat16", 128, 2, 129, 300, 4, 2, (-1, -1), False, 30.0),
  ("float16", 64, 2, 200, 333, 6, 2, (-1, 0), True, 0.0),
  ("bfloat16", 256, 1, 130, 100, 2, 2, (-1, 0), False, 15.0),
  ("bfloat16", 96, 1, 65, 257, 2, 1, (16, 8), False, 0.0),
  ("bfloat16", 192, 1, 1, 90, 2, 2, (-1, -1), False, 0.0),
  # 256 tiles: persistent CTAs take 2; then the same, claimed dynamically
  ("bfloat16", 128, 2, 200, 1000, 16, 16, (-1, -1), False, 0.0),
  ("bfloat16", 128, 2, 1000, 1000, 16, 16, (-1, 0), False, 0.0),
]


def main():
  # Optional: only these head dims (e.g. `python tools/sanitize_cases.py 256`).
  head_dims = {int(a) for a in sys.argv[1:]}
  rng = np.random.default_rng(0)
  compiled_bwd = kernel_ffi.compiled("bwd")
  bad = 0
  for dtype, d, b, sq, sk, h, hk, window, seqused, softcap in CASES:
    if head_dims and d not in head_dims:
      continue
    q, k, v = (
      jnp.asarray(rng.standard_normal(s, np.float32), dtype)
      for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d))
    )
    lengths = {}
    if seqused:
      lengths = dict(
        seqused_q=jnp.asarray(rng.integers(0, sq + 1, b), jnp.int32),
        seqused_k=jnp.asarray(rng.integers(0, sk + 1, b), jnp.int32),
      )
    kw = dict(
      softmax_scale=1 / math.sqrt(d),
      softcap=softcap,
      window=window,
      diagonal_offset=sk - sq,
      **lengths,
    )
    out, lse = kernel_ffi.fwd(q, k, v, **kw)
    results = [("out", out), ("lse", lse)]
    if (dtype, d) in compiled_bwd:
      for deterministic in (False, True):
        grads = kernel_ffi.bwd(out, q, k, v, out, lse, **kw, deterministic=deterministic)
        results += list(zip(("dq", "dk", "dv"), grads))
    for name, x in results:
      if np.isnan(np.asarray(x, np.float32)).any():
        print(f"NaN in {name}: {dtype} d{d} b{b} q{sq} k{sk} h{h}/{hk} window={window}")
        bad += 1
    print(f"done {dtype} d{d} q{sq} k{sk} softcap={softcap}", flush=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
