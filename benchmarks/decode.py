"""KV-cache decode bandwidth: one new token per sequence attending to its whole cache.

Compares, on the same cache contents (32 query / 8 KV heads by default, bfloat16):
- jax_fa3: `flash_attention_with_kvcache` with an append of 1 token (its write included),
  contiguous (page_size 0) and paged (page_size 16, 64, 256, random page table);
- cudnn, xla: `jax.nn.dot_product_attention(key_value_seq_lengths=...)` on the contiguous cache;
- pallas: `jax.experimental.pallas.ops.gpu.decode_attention.gqa`.
gbps = K + V bytes read (the sequence's keys, all of them) / kernel time.

jax_fa3 updates its caches in place: the measured function threads them through `steps`
calls in one jit, so XLA copies the (undonated) inputs once; the time per call is
(t(11 calls) - t(1 call)) / 10, which drops that copy.

Writes decode.json and decode.md to benchmarks/results/<date>_<card>/ (or --out).

    python benchmarks/decode.py --batches 1 8 --seqlens 32768 --page-sizes 0 64
"""

import argparse
import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa3
from bench import card_name, default_out_dir, results_header
from timing import on_gpu, time_ms

IMPLS = ("jax_fa3", "cudnn", "xla", "pallas")
STEPS = (1, 11)  # calls per measured function; their difference gives one call's time


@dataclasses.dataclass(frozen=True)
class Decode:
  batch: int
  seqlen_k: int  # keys attended per sequence (the cache holds seqlen_k - 1, plus 1 appended)
  heads: int
  kv_heads: int
  head_dim: int
  page_size: int  # 0 = contiguous
  dtype: str = "bfloat16"

  def kv_bytes(self):
    return (
      2
      * self.batch
      * self.seqlen_k
      * self.kv_heads
      * self.head_dim
      * jnp.dtype(self.dtype).itemsize
    )

  def inputs(self):
    """q, caches, lengths, the new token and the page table (None when contiguous)."""
    dtype = jnp.dtype(self.dtype)
    keys = jax.random.split(jax.random.key(self.batch * 7 + self.seqlen_k), 5)
    q = jax.random.normal(keys[0], (self.batch, 1, self.heads, self.head_dim), dtype)
    new = [
      jax.random.normal(k, (self.batch, 1, self.kv_heads, self.head_dim), dtype) for k in keys[3:]
    ]
    lengths = jnp.full((self.batch,), self.seqlen_k - 1, jnp.int32)
    if not self.page_size:
      shape = (self.batch, self.seqlen_k, self.kv_heads, self.head_dim)
      return q, *(jax.random.normal(k, shape, dtype) for k in keys[1:3]), lengths, new, None
    max_pages = -(-self.seqlen_k // self.page_size)
    num_pages = self.batch * max_pages
    table = np.random.default_rng(0).permutation(num_pages).reshape(self.batch, max_pages)
    shape = (num_pages, self.page_size, self.kv_heads, self.head_dim)
    return (
      q,
      *(jax.random.normal(k, shape, dtype) for k in keys[1:3]),
      lengths,
      new,
      jnp.asarray(table, jnp.int32),
    )


def problems(batches, seqlens, page_sizes, head_dims, heads, kv_heads):
  cells = [
    Decode(b, s, heads, kv_heads, 128, p)
    for b, s, p in itertools.product(batches, seqlens, page_sizes)
  ]
  # Other head dims at 32k (or the longest asked for), contiguous.
  seqlen = 32768 if 32768 in seqlens else max(seqlens)
  cells += [
    Decode(b, seqlen, heads, kv_heads, d, 0) for d in head_dims if d != 128 for b in batches
  ]
  return cells


def attend_threaded(q, k_cache, v_cache, lengths, k_new, v_new, table, calls, num_splits=0):
  """`calls` decode calls with the same append, the caches threaded from each to the next
  (updated in place, as in a decode loop); the last call's output. Only out leaves: the
  profiler keeps every run's results alive, and caches of tens of GB per run would not fit
  (batch 64 x 128k: 34 GB of K and V). From the second call on, a call finds L2 as a decode
  loop leaves it, not as XLA's copy of the undonated caches before the first leaves it."""
  out = None
  append = dict(k_new=k_new, v_new=v_new, page_table=table, num_splits=num_splits)
  for _ in range(calls):
    out, k_cache, v_cache = jax_fa3.flash_attention_with_kvcache(
      q, k_cache, v_cache, lengths, **append
    )
  return out


def ours_ms(problem, iterations):
  q, k_cache, v_cache, lengths, (k_new, v_new), table = problem.inputs()

  def calls(n):
    run = functools.partial(attend_threaded, calls=n)
    return time_ms(run, q, k_cache, v_cache, lengths, k_new, v_new, table, iterations=iterations)

  if not on_gpu():
    return calls(1)
  few, many = (calls(n) for n in STEPS)
  return (many - few) / (STEPS[1] - STEPS[0])


def baseline_ms(impl, problem, iterations):
  q, k_cache, v_cache, _, _, _ = problem.inputs()
  lengths = jnp.full((problem.batch,), problem.seqlen_k, jnp.int32)
  if impl in ("cudnn", "xla"):
    fn = lambda q, k, v, lengths: jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths, implementation=impl
    )
    return time_ms(fn, q, k_cache, v_cache, lengths, iterations=iterations)
  from jax.experimental.pallas.ops.gpu import decode_attention  # pylint: disable=import-outside-toplevel

  fn = lambda q, k, v, lengths: decode_attention.gqa(q[:, 0], k, v, kv_seq_len=lengths)
  return time_ms(fn, q, k_cache, v_cache, lengths, iterations=iterations)


def run(problem_list, impls, iterations, card, on_record):
  records = []
  steps = [(p, i) for p in problem_list for i in impls if i == "jax_fa3" or p.page_size == 0]
  for index, (problem, impl) in enumerate(steps, 1):
    prefix = (
      f"[{index:3}/{len(steps)}] {impl:8} d={problem.head_dim:<3} batch={problem.batch:<3} "
      f"seqlen_k={problem.seqlen_k:<6} page={problem.page_size:<3}"
    )
    if impl != "jax_fa3" and not on_gpu():
      print(f"{prefix} skipped: needs an NVIDIA GPU", flush=True)
      continue
    try:
      ms = (
        ours_ms(problem, iterations)
        if impl == "jax_fa3"
        else baseline_ms(impl, problem, iterations)
      )
    except Exception as e:  # pylint: disable=broad-except
      if impl == "jax_fa3" and "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print(f"{prefix} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
      continue
    finally:
      jax.clear_caches()
    gbps = problem.kv_bytes() / ms / 1e6
    records.append(
      dict(
        impl=impl,
        mode="decode",
        dtype=problem.dtype,
        batch=problem.batch,
        seqlen_q=1,
        seqlen_k=problem.seqlen_k,
        heads=problem.heads,
        kv_heads=problem.kv_heads,
        head_dim=problem.head_dim,
        page_size=problem.page_size,
        append=1 if impl == "jax_fa3" else 0,
        ms=ms,
        gbps=gbps,
        card=card,
      )
    )
    print(f"{prefix} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s", flush=True)
    on_record(records)
  return records


def markdown(records, header):
  lines = [
    f"# Decode: {header}",
    "",
    "GB/s = K+V bytes / kernel time (jax_fa3 includes its 1-token append). "
    "jax_fa3 columns by page size (0 = contiguous); ratio = contiguous jax_fa3 / cuDNN.",
    "",
  ]
  value = {
    (r["head_dim"], r["batch"], r["seqlen_k"], r["impl"], r["page_size"]): r["gbps"]
    for r in records
  }
  pages = sorted({r["page_size"] for r in records if r["impl"] == "jax_fa3"})
  others = [i for i in IMPLS[1:] if any(r["impl"] == i for r in records)]
  columns = [f"jax_fa3 p{p}" for p in pages] + others
  lines += [
    "| d | batch | seqlen_k | " + " | ".join(columns) + " | vs cuDNN |",
    "|---|---|---|" + "---|" * (len(columns) + 1),
  ]
  for d, b, s in sorted({k[:3] for k in value}):
    cells = [value.get((d, b, s, "jax_fa3", p)) for p in pages] + [
      value.get((d, b, s, i, 0)) for i in others
    ]
    ours, cudnn = value.get((d, b, s, "jax_fa3", 0)), value.get((d, b, s, "cudnn", 0))
    ratio = f"{ours / cudnn:.2f}x" if ours and cudnn else "-"
    lines.append(
      f"| {d} | {b} | {s} | "
      + " | ".join("-" if c is None else f"{c:.0f}" for c in cells)
      + f" | {ratio} |"
    )
  return "\n".join(lines + [""])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=None)
  parser.add_argument("--seqlens", type=int, nargs="+", default=None)
  parser.add_argument("--page-sizes", type=int, nargs="+", default=None)
  parser.add_argument("--head-dims", type=int, nargs="+", default=None)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
  parser.add_argument("--iterations", type=int, default=None)
  parser.add_argument("--out", type=__import__("pathlib").Path)
  args = parser.parse_args(argv)
  gpu = on_gpu()
  batches = args.batches or ((1, 8, 64) if gpu else (1, 2))
  seqlens = args.seqlens or ((8192, 32768, 131072) if gpu else (256,))
  page_sizes = args.page_sizes or ((0, 16, 64, 256) if gpu else (0, 16))
  head_dims = args.head_dims or ((64, 128, 256) if gpu else (128,))
  iterations = args.iterations or (10 if gpu else 2)
  card = card_name()
  out_dir = args.out or default_out_dir(card)
  out_dir.mkdir(parents=True, exist_ok=True)
  save = lambda records: (out_dir / "decode.json").write_text(json.dumps(records, indent=1))
  records = run(
    problems(batches, seqlens, page_sizes, head_dims, args.heads, args.kv_heads),
    args.impls,
    iterations,
    card,
    save,
  )
  save(records)
  table = markdown(records, results_header(card, "bfloat16", iterations))
  (out_dir / "decode.md").write_text(table)
  print("\n" + table)
  print("wrote", [str(out_dir / "decode.json"), str(out_dir / "decode.md")])


if __name__ == "__main__":
  main()
