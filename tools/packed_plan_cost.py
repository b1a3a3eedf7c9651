"""What a packed call spends outside the attention kernel: per-kernel CUPTI times of
`flash_attention(segment_ids=...)` (forward, and forward+backward), grouped into the
attention kernels and the rest (the rows and tile plans built in XLA), for each
`jnp.searchsorted` method the plan could use.

    python tools/packed_plan_cost.py [--row 16384] [--mean-doc 2048] [--head-dim 128]
"""

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import packed  # noqa: E402
from kernel_breakdown import per_kernel_ms, short  # noqa: E402

import jax_fa3  # noqa: E402

ATTENTION = ("fwd_kernel", "bwd_kernel", "bwd_preprocess", "bwd_sink_grad", "bwd_convert")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--row", type=int, default=16384)
  parser.add_argument("--mean-doc", type=int, default=2048)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--methods", nargs="+", default=["scan", "scan_unrolled", "sort"])
  args = parser.parse_args()
  problem = packed.Packed(args.row, args.mean_doc, args.head_dim, 2048 // args.head_dim, True, 1)
  q, k, v, dout = problem.inputs()
  ids = jnp.asarray(problem.segment_ids())
  original = jnp.searchsorted
  for method in args.methods:
    jnp.searchsorted = functools.partial(original, method=method)
    attend = lambda q, k, v, ids: jax_fa3.flash_attention(q, k, v, segment_ids=ids, causal=True)
    cases = {
      "fwd": (jax.jit(attend), (q, k, v, ids)),
      "fwdbwd": (
        jax.jit(lambda q, k, v, ids, d: jax.vjp(lambda *x: attend(*x, ids), q, k, v)[1](d)),
        (q, k, v, ids, dout),
      ),
    }
    for mode, (fn, fn_args) in cases.items():
      kernels = per_kernel_ms(fn, fn_args, 10)
      ours = sum(ms for name, ms in kernels if any(a in name for a in ATTENTION))
      rest = sum(ms for name, ms in kernels) - ours
      print(
        f"searchsorted={method:13} {mode:6}: attention {ours * 1e3:8.1f} us, the rest {rest * 1e3:7.1f} us "
        f"in {len(kernels)} kernels",
        flush=True,
      )
      for name, ms in sorted(kernels, key=lambda x: -x[1])[:12]:
        print(f"    {ms * 1e3:8.1f} us  {short(name, 90)}")
      jax.clear_caches()
  jnp.searchsorted = original


if __name__ == "__main__":
  main()
