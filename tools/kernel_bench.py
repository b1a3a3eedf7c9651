"""Quick side-by-side forward timing of the raw FFI kernel and jax.nn's cuDNN path.

The full benchmark (all impls, fwd+bwd, plots) is benchmarks/bench.py; this one exists
for the kernel loop: it needs only the extension, and prints one short table.
Timing is CUPTI kernel time (median of N runs) via jax.experimental.mosaic.gpu.profiler."""

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import profiler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gpu"))
import kernel_ffi  # noqa: E402


def median_ms(f, *args, iterations):
  _, times = profiler.measure(f, iterations=iterations)(*args)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--head-dims", default="64,128,256")
  ap.add_argument("--seqlens", default="512,2048,8192,16384")
  ap.add_argument("--causal", default="0,1")
  ap.add_argument("--iterations", type=int, default=10)
  ap.add_argument(
    "--batch", type=int, default=None, help="default: 16384 // seqlen (the paper sweep)"
  )
  ap.add_argument("--impls", default="jax_fa3,cudnn")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  card = jax.devices()[0].device_kind
  rows = []
  for d in map(int, args.head_dims.split(",")):
    for causal in map(int, args.causal.split(",")):
      for s in map(int, args.seqlens.split(",")):
        b, h = args.batch or max(1, 16384 // s), 2048 // d
        key = jax.random.key(s + d)
        q, k, v = (
          jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in jax.random.split(key, 3)
        )
        scale = 1 / math.sqrt(d)
        window = (-1, 0) if causal else (-1, -1)
        ours = jax.jit(
          lambda q, k, v: kernel_ffi.fwd(q, k, v, softmax_scale=scale, window=window)[0]
        )
        cudnn = jax.jit(
          lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=bool(causal), implementation="cudnn"
          )
        )
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        for impl, f in (("jax_fa3", ours), ("cudnn", cudnn)):
          if impl not in args.impls.split(","):
            continue
          try:
            ms = median_ms(f, q, k, v, iterations=args.iterations)
          except Exception as e:  # report and continue the sweep
            print(f"{impl} d{d} causal={causal} s{s}: {type(e).__name__}: {e}"[:300], flush=True)
            continue
          rows.append(
            dict(
              impl=impl,
              mode="fwd",
              dtype="bfloat16",
              head_dim=d,
              causal=bool(causal),
              batch=b,
              heads=h,
              seqlen_q=s,
              seqlen_k=s,
              ms=ms,
              tflops=flops / ms / 1e9,
              card=card,
            )
          )
          print(
            f"{impl:8s} d{d:<4d} causal={causal} s={s:<6d} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s",
            flush=True,
          )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  print("\nhead_dim causal seqlen | jax_fa3 | cudnn | ratio")
  by = {(r["impl"], r["head_dim"], r["causal"], r["seqlen_q"]): r["tflops"] for r in rows}
  for (impl, d, c, s), t in by.items():
    if impl == "jax_fa3":
      other = by.get(("cudnn", d, c, s), float("nan"))
      print(f"{d:8d} {int(c):6d} {s:6d} | {t:7.1f} | {other:5.1f} | {t / other:5.2f}")


if __name__ == "__main__":
  main()
