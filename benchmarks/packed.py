"""Packed sequences: documents of random length in fixed rows, attention within documents.

Compares, on the same inputs:
- jax_fa3: `flash_attention(segment_ids=...)`, one call for the packed rows;
- jax_fa3_per_document: one `flash_attention` call per document (kernel times summed);
- cudnn_dense_mask: `jax.nn.dot_product_attention(mask=...)` with the dense document mask;
- pallas_triton_segment_ids: Pallas' Triton `mha(segment_ids=...)`.
"Useful" TFLOP/s count the in-document work only: 4 * heads * head_dim * sum(len^2), halved
when causal (forward; x3.5 for forward+backward), whatever each implementation computes.

Writes packed.json, packed.md and packed.png to benchmarks/results/<date>_<card>/ (or --out).
The notebook (attention_benchmark.ipynb) runs the same sizes through `problems` and `run`.

    python benchmarks/packed.py --head-dims 128 --row-lengths 16384 --mean-docs 512
"""

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

import jax_fa3
from bench import card_name, default_out_dir, format_tflops, pyplot, results_header
from timing import on_gpu, time_ms

IMPLS = ("jax_fa3", "jax_fa3_per_document", "cudnn_dense_mask", "pallas_triton_segment_ids")
MODES = ("packed_fwd", "packed_fwdbwd")
FLOP_FACTOR = {"packed_fwd": 1.0, "packed_fwdbwd": 3.5}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The problems measured when no flag says otherwise."""

  hidden: int  # heads = hidden / head_dim
  tokens: int  # per problem: batch = tokens / row length
  head_dims: tuple[int, ...]
  row_lengths: tuple[int, ...]
  mean_docs: tuple[int, ...]
  iterations: int


# Issue 13's sizes. Without a GPU, the reference path at sizes that compile in seconds: one
# jitted function holds a call per document, so fewer tokens than on a GPU.
GPU_SIZES = Sizes(2048, 16384, (64, 128, 256), (8192, 16384), (512, 2048), 10)
CPU_SIZES = Sizes(128, 1024, (64,), (256,), (64,), 2)


@dataclasses.dataclass(frozen=True)
class Packed:
  row_length: int
  mean_doc: int
  head_dim: int
  heads: int
  causal: bool
  batch: int
  dtype: str = "bfloat16"

  def documents(self):
    """Per row, the document lengths (uniform in [mean/4, 7 mean/4], the last one cut)."""
    rng = np.random.default_rng(self.row_length + self.mean_doc)
    rows = []
    for _ in range(self.batch):
      lengths, total = [], 0
      while total < self.row_length:
        length = min(
          int(rng.integers(self.mean_doc // 4, 7 * self.mean_doc // 4 + 1)), self.row_length - total
        )
        lengths.append(length)
        total += length
      rows.append(lengths)
    return rows

  def segment_ids(self):
    return np.stack(
      [np.repeat(np.arange(len(row), dtype=np.int32), row) for row in self.documents()]
    )

  def useful_flops(self, mode):
    squares = sum(length**2 for row in self.documents() for length in row)
    fwd = 4 * self.heads * self.head_dim * squares
    return FLOP_FACTOR[mode] * (fwd / 2 if self.causal else fwd)

  def inputs(self):
    shape = (self.batch, self.row_length, self.heads, self.head_dim)
    keys = jax.random.split(jax.random.key(self.row_length + self.head_dim), 4)
    return [jax.random.normal(key, shape, jnp.dtype(self.dtype)) for key in keys]


def problems(sizes, causal=(False, True), head_dims=None, row_lengths=None, mean_docs=None):
  """The problems of `sizes` (or of the head dims, row lengths and mean document lengths given):
  per head dim, causal or not, per row length and mean document length."""
  return [
    Packed(row, doc, d, sizes.hidden // d, c, max(1, sizes.tokens // row))
    for d, c, row, doc in itertools.product(
      head_dims or sizes.head_dims,
      causal,
      row_lengths or sizes.row_lengths,
      mean_docs or sizes.mean_docs,
    )
  ]


def timed(impl, problem, mode):
  """(function, arguments) whose kernel time is measured."""
  q, k, v, dout = problem.inputs()
  ids = jnp.asarray(problem.segment_ids())
  if impl == "jax_fa3_per_document":
    # Every document's slices made beforehand, so that only attention kernels are timed.
    starts = [np.cumsum([0] + row)[:-1] for row in problem.documents()]
    pieces = [
      tuple(x[b : b + 1, s : s + n] for x in (q, k, v, dout))
      for b, row in enumerate(problem.documents())
      for s, n in zip(starts[b], row)
    ]
    attend = lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=problem.causal)
    if mode == "packed_fwd":
      return (lambda pieces: [attend(q, k, v) for q, k, v, _ in pieces]), (pieces,)
    return (lambda pieces: [jax.vjp(attend, q, k, v)[1](d) for q, k, v, d in pieces]), (pieces,)
  if impl == "jax_fa3":
    attention = lambda q, k, v: jax_fa3.flash_attention(
      q, k, v, segment_ids=ids, causal=problem.causal
    )
  elif impl == "cudnn_dense_mask":
    mask = ids[:, None, :, None] == ids[:, None, None, :]
    attention = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=problem.causal, implementation="cudnn"
    )
  else:
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # pylint: disable=import-outside-toplevel

    scale = problem.head_dim**-0.5
    attention = lambda q, k, v: pallas_attention.mha(
      q, k, v, ids, sm_scale=scale, causal=problem.causal
    )
  if mode == "packed_fwd":
    return attention, (q, k, v)
  return (lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout)), (q, k, v, dout)


def run(problem_list, modes, impls, iterations, card, on_record):
  records = []
  steps = list(itertools.product(problem_list, modes, impls))
  for index, (problem, mode, impl) in enumerate(steps, 1):
    prefix = (
      f"[{index:3}/{len(steps)}] {impl:26} {mode:13} d={problem.head_dim:<3} "
      f"causal={problem.causal!s:5} row={problem.row_length:<5} doc~{problem.mean_doc:<5}"
    )
    if impl != "jax_fa3" and impl != "jax_fa3_per_document" and not on_gpu():
      print(f"{prefix} skipped: needs an NVIDIA GPU", flush=True)
      continue
    try:
      fn, args = timed(impl, problem, mode)
      ms = time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      if impl.startswith("jax_fa3"):
        raise
      print(f"{prefix} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
      continue
    useful = problem.useful_flops(mode) / ms / 1e9
    documents = [n for row in problem.documents() for n in row]
    records.append(
      dict(
        impl=impl,
        mode=mode,
        dtype=problem.dtype,
        head_dim=problem.head_dim,
        causal=problem.causal,
        batch=problem.batch,
        heads=problem.heads,
        seqlen_q=problem.row_length,
        seqlen_k=problem.row_length,
        mean_doc_len=float(np.mean(documents)),
        documents=len(documents),
        ms=ms,
        useful_tflops=useful,
        card=card,
      )
    )
    print(f"{prefix} {ms:9.3f} ms {useful:8.3g} useful TFLOP/s", flush=True)
    on_record(records)
  return records


def markdown(records, header):
  lines = [
    f"# Packed sequences: {header}",
    "",
    "Useful TFLOP/s (in-document work only); ratio = jax_fa3 / per-document calls, "
    "jax_fa3 / cuDNN dense mask.",
    "",
  ]
  for mode in MODES:
    rows = [r for r in records if r["mode"] == mode]
    if not rows:
      continue
    labels = [impl for impl in IMPLS if any(r["impl"] == impl for r in rows)]
    value = {
      (r["head_dim"], r["causal"], r["seqlen_q"], r["mean_doc_len"], r["impl"]): r["useful_tflops"]
      for r in rows
    }
    lines += [
      f"## {mode}",
      "",
      "| head dim | causal | row | mean doc | " + " | ".join(labels) + " | vs per-doc | vs cuDNN |",
      "|---|---|---|---|" + "---|" * (len(labels) + 2),
    ]
    for size in sorted({key[:4] for key in value}):
      cells = [format_tflops(value.get((*size, l))) for l in labels]
      ours = value.get((*size, "jax_fa3"))
      ratios = [
        f"{ours / value[(*size, other)]:.2f}x" if ours and (*size, other) in value else "-"
        for other in ("jax_fa3_per_document", "cudnn_dense_mask")
      ]
      lines.append(
        f"| {size[0]} | {'yes' if size[1] else 'no'} | {size[2]} | {size[3]:.0f} | "
        + " | ".join(cells + ratios)
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


def plot(records, header, out_dir):
  plt = pyplot()
  if plt is None:
    return []
  cells_per_mode = len(
    {(r["head_dim"], r["causal"], r["seqlen_q"], round(r["mean_doc_len"])) for r in records}
  )
  fig, axes = plt.subplots(
    len(MODES), 1, figsize=(max(10, 0.55 * cells_per_mode), 9), squeeze=False
  )
  for ax, mode in zip(axes[:, 0], MODES):
    rows = [r for r in records if r["mode"] == mode]
    cells = sorted(
      {(r["head_dim"], r["causal"], r["seqlen_q"], round(r["mean_doc_len"])) for r in rows}
    )
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
      values = {
        (r["head_dim"], r["causal"], r["seqlen_q"], round(r["mean_doc_len"])): r["useful_tflops"]
        for r in rows
        if r["impl"] == impl
      }
      ax.bar(
        [c + i * width for c in range(len(cells))],
        [values.get(cell, 0) for cell in cells],
        width,
        label=impl,
      )
    row_label = lambda row: f"{row // 1024}k" if row % 1024 == 0 else str(row)
    ax.set_xticks(
      [c + 0.4 - width / 2 for c in range(len(cells))],
      [
        f"d{d}\n{'causal' if c else 'full'}\nrow {row_label(row)}\ndoc {doc}"
        for d, c, row, doc in cells
      ],
      fontsize=7,
    )
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title(mode)
    ax.grid(alpha=0.3, axis="y")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"packed sequences: {header}", fontsize=9)
  fig.tight_layout()
  path = out_dir / "packed.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=None)
  parser.add_argument("--row-lengths", type=int, nargs="+", default=None)
  parser.add_argument("--mean-docs", type=int, nargs="+", default=None)
  parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
  parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
  parser.add_argument("--iterations", type=int, default=None)
  parser.add_argument("--out", type=__import__("pathlib").Path)
  args = parser.parse_args(argv)
  sizes = GPU_SIZES if on_gpu() else CPU_SIZES
  causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
  iterations = args.iterations or sizes.iterations
  card = card_name()
  out_dir = args.out or default_out_dir(card)
  out_dir.mkdir(parents=True, exist_ok=True)
  save = lambda records: (out_dir / "packed.json").write_text(json.dumps(records, indent=1))
  records = run(
    problems(sizes, causal, args.head_dims, args.row_lengths, args.mean_docs),
    args.modes,
    args.impls,
    iterations,
    card,
    save,
  )
  save(records)
  header = results_header(card, "bfloat16", iterations)
  table = markdown(records, header)
  (out_dir / "packed.md").write_text(table)
  print("\n" + table)
  print(
    "wrote",
    [
      str(p)
      for p in [out_dir / "packed.json", out_dir / "packed.md", *plot(records, header, out_dir)]
    ],
  )


if __name__ == "__main__":
  main()
