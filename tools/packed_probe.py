"""Where the packed forward loses against one call per document: CUPTI kernel times of the
packed call on the benchmark's documents, on the same documents cut to multiples of the
query tile (no tile straddles two documents), and on one document per row (segment ids all
zero) against the plain causal kernel.

    python tools/packed_probe.py [--head-dims 64 128] [--mean-doc 2048] [--row 16384]
"""

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import packed  # noqa: E402
from timing import time_ms  # noqa: E402

import jax_fa3  # noqa: E402


def useful_tflops(lengths, heads, head_dim, causal, ms):
  flops = 4 * heads * head_dim * sum(n * n for n in lengths) / (2 if causal else 1)
  return flops / ms / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--mean-doc", type=int, default=2048)
  parser.add_argument("--row", type=int, default=16384)
  parser.add_argument("--causal", choices=("yes", "no", "both"), default="both")
  parser.add_argument("--align", type=int, default=128)
  args = parser.parse_args()
  causal_values = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
  for head_dim in args.head_dims:
    for causal in causal_values:
      problem = packed.Packed(args.row, args.mean_doc, head_dim, 2048 // head_dim, causal, 1)
      q, k, v, _ = problem.inputs()
      lengths = problem.documents()[0]
      # The same number of documents, each cut to a multiple of the tile, the rest one last document.
      aligned = [max(args.align, n // args.align * args.align) for n in lengths[:-1]]
      aligned.append(args.row - sum(aligned))
      cases = {
          "packed": lengths,
          f"aligned{args.align}": aligned,
          "one_doc": [args.row],
      }
      for name, docs in cases.items():
        ids = jnp.asarray(np.repeat(np.arange(len(docs), dtype=np.int32), docs)[None])
        fn = lambda q, k, v, ids: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=causal)
        ms = time_ms(fn, q, k, v, ids, iterations=20)
        print(f"d={head_dim} causal={causal!s:5} {name:10} docs={len(docs):3} {ms * 1e3:8.1f} us "
              f"{useful_tflops(docs, problem.heads, head_dim, causal, ms):6.0f} useful TFLOP/s", flush=True)
      plain = lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal)
      ms = time_ms(plain, q, k, v, iterations=20)
      print(f"d={head_dim} causal={causal!s:5} {'no_ids':10} docs=  1 {ms * 1e3:8.1f} us "
            f"{useful_tflops([args.row], problem.heads, head_dim, causal, ms):6.0f} useful TFLOP/s", flush=True)
      starts = np.cumsum([0] + lengths)[:-1]
      pieces = [tuple(x[:, s:s + n] for x in (q, k, v)) for s, n in zip(starts, lengths)]
      per_doc = lambda pieces: [jax_fa3.flash_attention(a, b, c, causal=causal) for a, b, c in pieces]
      ms = time_ms(per_doc, pieces, iterations=20)
      print(f"d={head_dim} causal={causal!s:5} {'per_doc':10} docs={len(lengths):3} {ms * 1e3:8.1f} us "
            f"{useful_tflops(lengths, problem.heads, head_dim, causal, ms):6.0f} useful TFLOP/s", flush=True)


if __name__ == "__main__":
  main()
