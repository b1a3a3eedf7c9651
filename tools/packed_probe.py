"""Where the packed forward loses against one call per document: CUPTI kernel times of the
packed call on the benchmark's documents, on the same documents cut to multiples of the
query tile (no tile straddles two documents), and on one document per row (segment ids all
zero) against the plain causal kernel.

    python tools/packed_probe.py [--head-dims 64 128] [--mean-doc 2048] [--row 16384]
"""

import argparse
import pathlib
import sys

import jax
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
  parser.add_argument(
    "--cases", nargs="+", default=["packed", "aligned", "one_doc", "no_ids", "per_doc"]
  )
  parser.add_argument(
    "--once", action="store_true", help="run each case once, untimed (for a profiler)"
  )
  args = parser.parse_args()

  def measure(name, docs, fn, *fn_args):
    if name.split("=")[0] not in args.cases:
      return
    if args.once:
      jax.block_until_ready(fn(*fn_args))
      print(f"d={head_dim} causal={causal!s:5} {name:10} ran once", flush=True)
      return
    ms = time_ms(fn, *fn_args, iterations=20)
    print(
      f"d={head_dim} causal={causal!s:5} {name:10} docs={len(docs):3} {ms * 1e3:8.1f} us "
      f"{useful_tflops(docs, problem.heads, head_dim, causal, ms):6.0f} useful TFLOP/s",
      flush=True,
    )

  causal_values = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
  for head_dim in args.head_dims:
    for causal in causal_values:
      problem = packed.Packed(args.row, args.mean_doc, head_dim, 2048 // head_dim, causal, 1)
      q, k, v, _ = problem.inputs()
      lengths = problem.documents()[0]
      # The same number of documents, each cut to a multiple of the tile, the rest one last document.
      aligned = [max(args.align, n // args.align * args.align) for n in lengths[:-1]]
      aligned.append(args.row - sum(aligned))
      cases = {"packed": lengths, "aligned": aligned, "one_doc": [args.row]}
      for name, docs in cases.items():
        ids = jnp.asarray(np.repeat(np.arange(len(docs), dtype=np.int32), docs)[None])
        fn = jax.jit(
          lambda q, k, v, ids: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=causal)
        )
        measure(name, docs, fn, q, k, v, ids)
      plain = jax.jit(lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal))
      measure("no_ids", [args.row], plain, q, k, v)
      starts = np.cumsum([0] + lengths)[:-1]
      pieces = [tuple(x[:, s : s + n] for x in (q, k, v)) for s, n in zip(starts, lengths)]
      per_doc = jax.jit(
        lambda pieces: [jax_fa3.flash_attention(a, b, c, causal=causal) for a, b, c in pieces]
      )
      measure("per_doc", lengths, per_doc, pieces)


if __name__ == "__main__":
  main()
