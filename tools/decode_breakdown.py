"""Per-kernel CUPTI times of one decode call (split kernel, combine) against cuDNN's, over
split counts: where the time of a short decode goes, and whether the split heuristic picks
well. Inputs as benchmarks/decode.py (32/8 heads, 1-token append, contiguous or paged).

    python tools/decode_breakdown.py [--batches 1] [--seqlens 8192 32768] [--head-dims 128]
                                     [--splits 0 8 16 32 64] [--page-size 0] [--json OUT]
"""

import argparse
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import decode  # noqa: E402  (the benchmark's inputs)
from kernel_breakdown import per_kernel_ms, short  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--splits", type=int, nargs="+", default=[0, 8, 16, 32, 64])
  parser.add_argument("--page-size", type=int, default=0)
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--json", type=pathlib.Path)
  args = parser.parse_args()
  rows = []
  for head_dim in args.head_dims:
    for batch in args.batches:
      for seqlen in args.seqlens:
        problem = decode.Decode(batch, seqlen, 32, 8, head_dim, args.page_size)
        q, k_cache, v_cache, lengths, (k_new, v_new), table = problem.inputs()
        cases = [(f"jax_fa3 splits={s}", s) for s in args.splits] + [("cudnn", None)]
        for label, splits in cases:
          if splits is None:
            full = lengths + 1
            fn = jax.jit(
              lambda q, k, v, n: jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=n, implementation="cudnn"
              )
            )
            fn_args = (q, k_cache, v_cache, full)
          else:
            # Two calls threaded; the second's kernels are reported (decode.attend_threaded).
            fn = jax.jit(
              lambda q, k, v, n, kn, vn, t, s=splits: decode.attend_threaded(
                q, k, v, n, kn, vn, t, calls=2, num_splits=s
              )
            )
            fn_args = (q, k_cache, v_cache, lengths, k_new, v_new, table)
          kernels = per_kernel_ms(fn, fn_args, args.iterations)
          if splits is not None:  # the second call's split kernel and combine
            ours = [kernel for kernel in kernels if "jax_fa3" in kernel[0]]
            kernels = ours[len(ours) // 2 :]
          total = sum(ms for _, ms in kernels)
          print(
            f"d={head_dim} batch={batch} seqlen_k={seqlen} {label:18} {total * 1e3:8.1f} us "
            f"{problem.kv_bytes() / total / 1e6:6.0f} GB/s  "
            + "  ".join(f"{short(n, 28)}={ms * 1e3:.1f}" for n, ms in kernels),
            flush=True,
          )
          rows.append(
            dict(
              label=label,
              head_dim=head_dim,
              batch=batch,
              seqlen_k=seqlen,
              page_size=args.page_size,
              kernels=kernels,
              total_ms=total,
            )
          )
          jax.clear_caches()
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
