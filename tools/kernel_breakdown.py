"""Per-kernel CUPTI times of one backward (or forward) call, jax_fa3's and cuDNN's, on the
benchmark's sizes: where the time of a pass goes (main kernel, preprocess, memset,
postprocess), without a profiler's serialization.

    python tools/kernel_breakdown.py [--head-dims 64 128 256] [--seqlens 1024 4096 16384]
                                     [--mode bwd] [--causal] [--json OUT]
"""

import argparse
import json
import pathlib
import statistics
import sys

from jax.experimental.mosaic.gpu import profiler

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (the benchmark's problem sizes and attention functions)


def per_kernel_ms(fn, args, iterations):
  """[(kernel name, median ms)] in launch order."""
  _, runs = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
  names = [name for name, _ in runs[0]]
  return [(name, statistics.median(run[i][1] for run in runs)) for i, name in enumerate(names)]


def short(name, width=60):
  return name if len(name) <= width else name[: width - 3] + "..."


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--mode", choices=("fwd", "bwd"), default="bwd")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--impls", nargs="+", default=["jax_fa3", "cudnn"])
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--json", type=pathlib.Path)
  args = parser.parse_args()
  rows = []
  for head_dim in args.head_dims:
    for seqlen in args.seqlens:
      problem = bench.Problem(
        head_dim=head_dim,
        causal=args.causal,
        seqlen=seqlen,
        batch=16384 // seqlen,
        heads=2048 // head_dim,
        dtype="bfloat16",
      )
      q, k, v, dout = problem.inputs("bfloat16")
      for impl in args.impls:
        fn, fn_args = bench.timed_call(bench.attention_fn(impl, problem), args.mode, q, k, v, dout)
        kernels = per_kernel_ms(fn, fn_args, args.iterations)
        total = sum(ms for _, ms in kernels)
        print(
          f"\n{impl} {args.mode} d={head_dim} seqlen={seqlen} causal={args.causal}: {total:.3f} ms, "
          f"{problem.flops(args.mode) / total / 1e9:.0f} TFLOP/s"
        )
        for name, ms in kernels:
          print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {short(name)}")
        rows.append(
          dict(
            impl=impl,
            mode=args.mode,
            head_dim=head_dim,
            seqlen=seqlen,
            causal=args.causal,
            kernels=kernels,
            total_ms=total,
          )
        )
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
