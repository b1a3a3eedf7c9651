"""Benchmark jax_fa3 against jax.nn.dot_product_attention (cuDNN, XLA) and Pallas Mosaic-GPU.

The sweep is the FlashAttention-3 paper's: hidden 2048, so head dims 64/128/256 have
32/16/8 heads; seqlen 512 ... 16384 with batch x seqlen = 16384; causal and not; bfloat16.
Modes: fwd, bwd (the pullback of jax.vjp alone) and fwdbwd (jax.vjp and its pullback).
FLOPs: fwd = 4 * batch * heads * seqlen^2 * head_dim, halved when causal; bwd 2.5x, fwdbwd 3.5x.
Timing: CUPTI kernel time, median of --iterations runs (see timing.py).

Without a GPU it runs small sizes on the float32 reference path with wall-clock timing,
and says so: such numbers check the plumbing, not the kernels.

Writes results.json, results.md and tflops_<mode>.png to
benchmarks/results/<YYYY-MM-DD>_<card>/ (or --out).

    python benchmarks/bench.py --head-dims 128 --modes fwd --impls jax_fa3 cudnn
"""

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import pathlib
import re

import jax
import jax.numpy as jnp

import jax_fa3
from timing import on_gpu, time_ms, timing_method

OURS = ("jax_fa3", "jax_fa3_deterministic")  # the second runs the deterministic backward
IMPLS = (*OURS, "cudnn", "xla", "pallas", "fa3_wheel")
MODES = ("fwd", "bwd", "fwdbwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
# XLA materializes the float32 scores; past this size it only measures memory traffic (or OOMs).
XLA_MAX_SCORE_BYTES = 8 << 30
NO_GPU_BANNER = """
************************************************************************************
*  NO GPU: running small sizes on jax_fa3's float32 REFERENCE path, timed by the    *
*  wall clock. These numbers check that everything runs; they say nothing about    *
*  the Hopper kernels. Run on an H100 for the real benchmark.                       *
************************************************************************************
"""


@dataclasses.dataclass(frozen=True)
class Sweep:
  hidden: int  # heads = hidden / head_dim
  tokens: int  # batch = tokens / seqlen
  head_dims: tuple[int, ...]
  seqlens: tuple[int, ...]
  iterations: int


GPU_SWEEP = Sweep(2048, 16384, (64, 128, 256), (512, 1024, 2048, 4096, 8192, 16384), 10)
CPU_SWEEP = Sweep(256, 1024, (64,), (128, 256, 512), 3)


@dataclasses.dataclass(frozen=True)
class Problem:
  batch: int
  seqlen: int
  heads: int
  head_dim: int
  causal: bool
  dtype: str

  def flops(self, mode):
    fwd = 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim
    return FLOP_FACTOR[mode] * (fwd / 2 if self.causal else fwd)

  def inputs(self, dtype):
    """q, k, v and an output cotangent: fresh random normal arrays."""
    shape = (self.batch, self.seqlen, self.heads, self.head_dim)
    keys = jax.random.split(jax.random.key(self.seqlen * 1000 + self.head_dim), 4)
    return [jax.random.normal(key, shape, dtype) for key in keys]


def sweep_problems(sweep, dtype, causal=(False, True), head_dims=None, seqlens=None):
  """The sweep's problems: per head dim, causal or not, per seqlen, batch x seqlen = tokens."""
  return [
    Problem(max(1, sweep.tokens // seqlen), seqlen, sweep.hidden // head_dim, head_dim, c, dtype)
    for head_dim in head_dims or sweep.head_dims
    for c in causal
    for seqlen in seqlens or sweep.seqlens
  ]


def card_name():
  return jax.devices()[0].device_kind if on_gpu() else "cpu"


def results_header(card, dtype, iterations):
  """The line heading a run's results: card, dtype, date, jax version and timing method."""
  header = (
    f"{card}, {dtype}, {datetime.date.today().isoformat()}, jax {jax.__version__}; "
    f"{timing_method(iterations)}"
  )
  return header if on_gpu() else header + "; NO GPU: float32 reference path"


def default_out_dir(card):
  """benchmarks/results/<YYYY-MM-DD>_<card>."""
  slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
  return pathlib.Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}_{slug}"


def attention_fn(impl, problem):
  """`(q, k, v) -> out` for `impl`."""
  if impl in OURS:
    deterministic = impl == "jax_fa3_deterministic"
    return lambda q, k, v: jax_fa3.flash_attention(
      q, k, v, causal=problem.causal, deterministic=deterministic
    )
  if impl in ("cudnn", "xla"):
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=problem.causal, implementation=impl
    )
  if impl == "fa3_wheel":  # FlashAttention-3's own kernels, bound by flash-attn3-jax
    import flash_attn3_jax  # pylint: disable=import-outside-toplevel

    return lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=problem.causal)
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel

  # Block sizes from jax's own tests; it has no softmax scale, which does not change the work.
  config = attention_mgpu.TuningConfig(
    block_q=64,
    block_kv=64 if problem.head_dim > 128 else 128,
    max_concurrent_steps=2,
    causal=problem.causal,
    compute_wgs_bwd=1 if problem.head_dim > 128 else 2,
    block_q_dkv=64,
    block_kv_dkv=64,
    block_q_dq=64,
    block_kv_dq=64,
  )
  return lambda q, k, v: attention_mgpu.attention(q, k, v, config)


def why_not(impl, problem, mode):
  """Why `impl` does not apply to this problem, or None."""
  if impl == "jax_fa3_deterministic" and mode == "fwd":
    return "the forward is jax_fa3's (deterministic changes the backward only)"
  if impl in ("cudnn", "pallas", "fa3_wheel") and not on_gpu():
    return "needs an NVIDIA GPU"
  if impl == "fa3_wheel":
    if importlib.util.find_spec("flash_attn3_jax") is None:
      return "flash-attn3-jax is not installed (carry its wheel to the GPU machine)"
    if problem.head_dim != 128:
      return "the flash-attn3-jax wheel ships head-dim-128 kernels only"
  score_bytes = 4 * problem.batch * problem.heads * problem.seqlen**2
  if impl == "xla" and on_gpu() and score_bytes > XLA_MAX_SCORE_BYTES:
    return f"its float32 scores would take {score_bytes / 2**30:.0f} GiB"
  if impl == "pallas" and problem.head_dim % 64:
    return "attention_mgpu needs head_dim % 64 == 0"
  if impl == "pallas" and problem.causal and mode != "fwd":
    return "attention_mgpu has no causal backward"
  return None


def timed_call(attention, mode, q, k, v, dout):
  """The function to time for `mode`, and its arguments."""
  if mode == "fwd":
    return attention, (q, k, v)
  if mode == "fwdbwd":
    return (lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout)), (q, k, v, dout)
  _, pullback = jax.vjp(attention, q, k, v)  # bwd: the forward runs here, untimed
  return (lambda pullback, dout: pullback(dout)), (pullback, dout)


def impl_dtype(impl, problem):
  """attention_mgpu runs float16 only; the others run the problem's dtype."""
  return "float16" if impl == "pallas" else problem.dtype


def impl_label(impl, problem, mode):
  """jax_fa3 is labelled "(reference)" where it runs no kernel for this mode, and an impl
  that runs another dtype than the problem's is labelled with it."""
  if impl_dtype(impl, problem) != problem.dtype:
    return f"{impl} ({impl_dtype(impl, problem)})"
  if impl not in OURS:
    return impl
  directions = ("fwd", "bwd") if mode == "fwdbwd" else (mode,)
  kernels = jax_fa3.kernels_available()
  on_kernels = on_gpu() and all(
    kernels.head_dims_for(d, problem.dtype, problem.head_dim, problem.head_dim) for d in directions
  )
  return impl if on_kernels else f"{impl} (reference)"


def run(problems, modes, impls, iterations, card, on_record=lambda records: None):
  """Times every (problem, mode, impl); `on_record(records)` runs after each new record, so
  a run cut short still leaves what it measured."""
  records = []
  total = len(problems) * len(modes) * len(impls)
  steps = itertools.product(problems, modes, impls)
  for index, (problem, mode, impl) in enumerate(steps, 1):
    label = impl_label(impl, problem, mode)
    prefix = (
      f"[{index:3}/{total}] {label:24} {mode:6} d={problem.head_dim:<3} "
      f"causal={problem.causal!s:5} seqlen={problem.seqlen:<5} batch={problem.batch:<3}"
    )
    reason = why_not(impl, problem, mode)
    if not reason and impl in OURS and label.endswith("(reference)") and on_gpu():
      reason = (
        "no kernel compiled for this mode and head dim (the float32 reference is not benchmarked)"
      )
    if reason:
      print(f"{prefix} skipped: {reason}", flush=True)
      continue
    try:
      inputs = problem.inputs(impl_dtype(impl, problem))
      fn, args = timed_call(attention_fn(impl, problem), mode, *inputs)
      ms = time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      if label in OURS:
        raise  # our kernels must run every size; baselines (and our reference) may decline
      print(f"{prefix} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
      continue
    tflops = problem.flops(mode) / ms / 1e9
    records.append(
      dict(
        impl=label,
        mode=mode,
        dtype=impl_dtype(impl, problem),
        head_dim=problem.head_dim,
        causal=problem.causal,
        batch=problem.batch,
        heads=problem.heads,
        seqlen_q=problem.seqlen,
        seqlen_k=problem.seqlen,
        ms=ms,
        tflops=tflops,
        card=card,
      )
    )
    print(f"{prefix} {ms:9.3f} ms {tflops:8.3g} TFLOP/s", flush=True)
    on_record(records)
  return records


def markdown(records, header):
  lines = [f"# Attention benchmark: {header}", ""]
  for mode in MODES:
    rows = [r for r in records if r["mode"] == mode]
    if not rows:
      continue
    labels = list(dict.fromkeys(r["impl"] for r in rows))
    tflops = {
      (r["head_dim"], r["causal"], r["seqlen_q"], r["batch"], r["impl"]): r["tflops"] for r in rows
    }
    lines += [
      f"## {mode} (TFLOP/s)",
      "",
      "| head dim | causal | seqlen | batch | " + " | ".join(labels) + " |",
      "|---|---|---|---|" + "---|" * len(labels),
    ]
    for size in sorted({key[:4] for key in tflops}):
      cells = [format_tflops(tflops.get((*size, label))) for label in labels]
      lines.append(
        "| {} | {} | {} | {} | ".format(size[0], "yes" if size[1] else "no", *size[2:])
        + " | ".join(cells)
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


def format_tflops(tflops):
  if tflops is None:
    return "-"
  return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend, or None (with a note) if it is missing."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed, so no plots (pip install matplotlib)")
    return None
  return plt


def plot(records, header, out_dir):
  """One PNG per mode: TFLOP/s against seqlen, a row per head dim, causal or not side by side."""
  plt = pyplot()
  if plt is None:
    return []
  paths = []
  for mode in MODES:
    rows = [r for r in records if r["mode"] == mode]
    if not rows:
      continue
    head_dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(
      len(head_dims), 2, figsize=(11, 3.4 * len(head_dims)), squeeze=False, sharex=True
    )
    for (row, head_dim), (col, causal) in itertools.product(
      enumerate(head_dims), enumerate((False, True))
    ):
      ax = axes[row][col]
      for label in dict.fromkeys(r["impl"] for r in rows):
        points = sorted(
          (r["seqlen_q"], r["tflops"])
          for r in rows
          if r["impl"] == label and r["head_dim"] == head_dim and r["causal"] == causal
        )
        if points:
          ax.plot(*zip(*points), marker="o", label=label)
      ax.set_xscale("log", base=2)
      seqlens = sorted({r["seqlen_q"] for r in rows})
      ax.set_xticks(seqlens, [str(s) for s in seqlens])
      ax.set_title(f"head dim {head_dim}, {'causal' if causal else 'not causal'}")
      ax.set_ylabel("TFLOP/s")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    for ax in axes[-1]:
      ax.set_xlabel("seqlen (batch x seqlen fixed)")
    fig.suptitle(f"{mode}: {header}")
    fig.tight_layout()
    paths.append(out_dir / f"tflops_{mode}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", help="default: 64 128 256 (GPU)")
  parser.add_argument("--seqlens", type=int, nargs="+", help="default: 512 ... 16384 (GPU)")
  parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
  parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
  parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
  parser.add_argument("--hidden", type=int, help="heads x head_dim (default 2048 on a GPU)")
  parser.add_argument("--tokens", type=int, help="batch x seqlen (default 16384 on a GPU)")
  parser.add_argument("--iterations", type=int, help="timed runs per point (default 10 on a GPU)")
  parser.add_argument(
    "--out", type=pathlib.Path, help="output folder (default benchmarks/results/<date>_<card>)"
  )
  parser.add_argument(
    "--replot",
    type=pathlib.Path,
    metavar="RESULTS_JSON",
    help="measure nothing: rewrite the markdown and plots of a results.json "
    "(say, of a run cut short) next to it",
  )
  return parser.parse_args(argv)


def write_report(records, header, out_dir):
  """results.md and the plots from `records` (results.json is written as records come)."""
  table = markdown(records, header)
  (out_dir / "results.md").write_text(table)
  written = [out_dir / "results.json", out_dir / "results.md", *plot(records, header, out_dir)]
  print("\n" + table)
  print("wrote " + ", ".join(str(p) for p in written))


def main(argv=None):
  args = parse_args(argv)
  if args.replot:
    records = json.loads(args.replot.read_text())
    header = f"{records[0]['card']}, {records[0]['dtype']} (replotted from {args.replot.name})"
    write_report(records, header, args.replot.parent)
    return
  sweep = GPU_SWEEP if on_gpu() else CPU_SWEEP
  if not on_gpu():
    print(NO_GPU_BANNER)
  card = card_name()
  sweep = dataclasses.replace(
    sweep, hidden=args.hidden or sweep.hidden, tokens=args.tokens or sweep.tokens
  )
  iterations = args.iterations or sweep.iterations
  causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
  problems = sweep_problems(sweep, args.dtype, causal, args.head_dims, args.seqlens)
  print(jax_fa3.kernels_available())
  print(f"card: {card}; {timing_method(iterations)}; jax {jax.__version__}", flush=True)

  out_dir = args.out or default_out_dir(card)
  out_dir.mkdir(parents=True, exist_ok=True)
  save = lambda records: (out_dir / "results.json").write_text(json.dumps(records, indent=1))
  records = run(problems, args.modes, args.impls, iterations, card, on_record=save)
  save(records)
  write_report(records, results_header(card, args.dtype, iterations), out_dir)
  if not on_gpu():
    print(NO_GPU_BANNER)


if __name__ == "__main__":
  main()
