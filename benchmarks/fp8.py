"""FP8 (e4m3) attention forward: jax_fa3's FP8 kernel against cuDNN's, beside both bf16 forwards.

Impls, forward only, same inputs (bfloat16 normal; their e4m3 quantization for the FP8 ones):
- jax_fa3: `flash_attention(q8, k8, v8, descale_q=, descale_k=, descale_v=)` on inputs
  quantized beforehand (per (batch, head), q and k rotated): the FP8 kernel alone;
- jax_fa3_fp8_attention: `jax_fa3.fp8_attention(q, k, v)` on the bf16 inputs, end to end:
  the quantization (Hadamard, block scales: three quantizer launches) included;
- jax_fa3_bf16: `flash_attention` on the bf16 inputs;
- cudnn_fp8: cuDNN's FP8 forward through jax's private
  `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., use_fp8=True)`, all
  scales 1 (it writes e4m3, not bf16);
- cudnn_bf16: `jax.nn.dot_product_attention(implementation="cudnn")`.
Sizes: the paper's, hidden 2048 (16 heads at d128, 8 at d256, 32 at d64), batch x seqlen =
16k tokens, seqlen 1k-16k, causal and not. FLOPs 4 * batch * heads * seqlen^2 * head_dim,
halved when causal. Timing: CUPTI kernel time, median (timing.py). A second part times the
quantizer alone (quantize_fp8 of q, k and v as fp8_attention calls it): GB/s of x read
once plus x8 and descale written.

Without a GPU it runs tiny sizes on the reference path with wall-clock timing, and says so.

Writes fp8.json, fp8.md and fp8.png to benchmarks/results/<date>_<card>/ (or --out).

    python benchmarks/fp8.py --quick
    python benchmarks/fp8.py --head-dims 256 --seqlens 16384 --causal no
"""

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

import jax_fa3
from bench import NO_GPU_BANNER, card_name, default_out_dir, pyplot, results_header
from timing import on_gpu, time_ms, timing_method

FP8 = "float8_e4m3fn"
IMPLS = ("jax_fa3", "jax_fa3_fp8_attention", "jax_fa3_bf16", "cudnn_fp8", "cudnn_bf16")
FP8_IMPLS = ("jax_fa3", "jax_fa3_fp8_attention", "cudnn_fp8")
OURS = ("jax_fa3", "jax_fa3_fp8_attention", "jax_fa3_bf16")
HIDDEN = 2048
# The targets (issue 15), checked in the markdown.
TARGET_VS_CUDNN = 1.05  # jax_fa3 / cudnn_fp8 at 8k and 16k
TARGET_D256_16K = 1150  # TFLOP/s, d256 non-causal 16k
CUDNN_MODULE = "jax._src.cudnn.fused_attention_stablehlo"


@dataclasses.dataclass(frozen=True)
class Problem:
  head_dim: int
  seqlen: int
  heads: int
  batch: int
  causal: bool

  def flops(self):
    full = 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim
    return full / 2 if self.causal else full

  def inputs(self):
    """q, k, v: fresh bfloat16 normal arrays."""
    keys = jax.random.split(jax.random.key(self.seqlen * 1000 + self.head_dim), 3)
    shape = (self.batch, self.seqlen, self.heads, self.head_dim)
    return [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]


def problems(head_dims, seqlens, causal, gpu):
  tokens, hidden = (16384, HIDDEN) if gpu else (512, 256)
  return [
    Problem(d, n, max(1, hidden // d), max(1, tokens // n), c)
    for d, c, n in itertools.product(head_dims, causal, seqlens)
  ]


def check_fp8_api():
  """The FP8 entry points this benchmark times (issue 15): stop with a clear message when the
  installed jax_fa3 does not have them yet."""
  missing = []
  if "descale_q" not in inspect.signature(jax_fa3.flash_attention).parameters:
    missing.append(
      "jax_fa3.flash_attention(q8, k8, v8, descale_q=..., descale_k=..., descale_v=...)"
    )
  if not hasattr(jax_fa3, "fp8_attention"):
    missing.append("jax_fa3.fp8_attention(q, k, v, ...)")
  if importlib.util.find_spec("jax_fa3.fp8_quantize") is None:
    missing.append("jax_fa3.fp8_quantize.quantize_fp8")
  if missing:
    raise SystemExit(
      "benchmarks/fp8.py needs the FP8 API of issue 15, missing here: "
      + "; ".join(missing)
      + f" (jax_fa3 imported from {jax_fa3.__file__})"
    )


def cudnn_fp8_problem():
  """Why cuDNN's FP8 forward cannot be called through this jax, or None."""
  if importlib.util.find_spec(CUDNN_MODULE) is None:
    return f"{CUDNN_MODULE} is not in jax {jax.__version__}"
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel

  if "use_fp8" not in inspect.signature(cudnn.dot_product_attention).parameters:
    return f"{CUDNN_MODULE}.dot_product_attention has no use_fp8 in jax {jax.__version__}"
  return None


def quantized(q, k, v):
  """q, k, v in e4m3 with one scale per (batch, head) (q and k rotated by one random-sign
  Hadamard transform) and their [batch, heads] descales: flash_attention's FP8 inputs."""
  from jax_fa3.fp8_quantize import quantize_fp8, random_signs  # pylint: disable=import-outside-toplevel

  signs = random_signs(q.shape[3])
  (q8, dq), (k8, dk) = (quantize_fp8(x, block_rows=None, signs=signs) for x in (q, k))
  v8, dv = quantize_fp8(v, block_rows=None)
  return (q8, k8, v8), {"descale_q": dq[..., 0], "descale_k": dk[..., 0], "descale_v": dv[..., 0]}


def timed_call(impl, problem, q, k, v):
  """The function to time for `impl` and its arguments (FP8 inputs made beforehand)."""
  causal = problem.causal
  if impl == "jax_fa3":
    qkv8, descales = quantized(q, k, v)
    return (
      lambda q8, k8, v8, descales: jax_fa3.flash_attention(q8, k8, v8, causal=causal, **descales),
      (*qkv8, descales),
    )
  if impl == "jax_fa3_fp8_attention":
    return lambda q, k, v: jax_fa3.fp8_attention(q, k, v, causal=causal), (q, k, v)
  if impl == "jax_fa3_bf16":
    return lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal), (q, k, v)
  if impl == "cudnn_bf16":
    return (
      lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"
      ),
      (q, k, v),
    )
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel

  names = getattr(cudnn, "fp8_params_keys", None) or cudnn.fp8_params_keys_fwd
  params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in names}
  mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
  scale = problem.head_dim**-0.5
  return (
    lambda q8, k8, v8: cudnn.dot_product_attention(
      q8, k8, v8, fp8_params=params, scale=scale, mask_type=mask, use_fp8=True
    )[0],
    tuple(x.astype(jnp.float8_e4m3fn) for x in (q, k, v)),
  )


def fp8_kernel_compiled(head_dim):
  kernels = jax_fa3.kernels_available()
  return (
    on_gpu()
    and kernels.head_dims_for("fwd", FP8, head_dim, head_dim, out_dtype="bfloat16") is not None
  )


def why_not(impl, problem):
  """Why `impl` is not timed for this problem, or None."""
  if impl.startswith("cudnn") and not on_gpu():
    return "needs an NVIDIA GPU"
  if impl == "cudnn_fp8":
    return cudnn_fp8_problem()
  if on_gpu() and impl in FP8_IMPLS[:2] and not fp8_kernel_compiled(problem.head_dim):
    return f"no FP8 forward kernel compiled for head dim {problem.head_dim} (the reference is not benchmarked)"
  return None


def impl_label(impl):
  return impl if on_gpu() else f"{impl} (reference)" if impl in OURS else impl


def run(problem_list, impls, iterations, card, on_record):
  """Times every (problem, impl); `on_record(records)` runs after each new record."""
  records = []
  steps = list(itertools.product(problem_list, impls))
  for index, (problem, impl) in enumerate(steps, 1):
    label = impl_label(impl)
    prefix = (
      f"[{index:3}/{len(steps)}] {label:34} d={problem.head_dim:<3} causal={problem.causal!s:5} "
      f"seqlen={problem.seqlen:<5} batch={problem.batch:<3}"
    )
    reason = why_not(impl, problem)
    if reason:
      print(f"{prefix} skipped: {reason}", flush=True)
      continue
    try:
      fn, args = timed_call(impl, problem, *problem.inputs())
      ms = time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      if impl in OURS:
        raise  # our kernels must run every size; the baselines may decline
      print(f"{prefix} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
      continue
    tflops = problem.flops() / ms / 1e9
    records.append(
      dict(
        part="attention",
        impl=label,
        mode="fwd",
        dtype=FP8 if impl in FP8_IMPLS else "bfloat16",
        input_dtype="bfloat16"
        if impl in ("jax_fa3_fp8_attention", "jax_fa3_bf16", "cudnn_bf16")
        else FP8,
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
    print(f"{prefix} {ms:9.3f} ms {tflops:8.4g} TFLOP/s", flush=True)
    on_record(records)
  return records


def run_quantizer(problem_list, iterations, card, records, on_record):
  """quantize_fp8 of q, k and v as fp8_attention calls it (q: 64-row blocks and the rotation,
  k: the kernel's key blocks and the rotation, v: one scale per head), one problem per
  (head dim, seqlen): GB/s of x read once plus x8 and descale written."""
  from jax_fa3.fp8_quantize import quantize_fp8, random_signs  # pylint: disable=import-outside-toplevel

  seen = {}
  for problem in problem_list:
    seen.setdefault((problem.head_dim, problem.seqlen), problem)
  for index, problem in enumerate(seen.values(), 1):
    x = problem.inputs()[0]
    signs = random_signs(problem.head_dim)
    q_block, k_block = jax_fa3.kernels_available().descale_block(FP8, "bfloat16", problem.head_dim)
    for tensor, block_rows, rotate in (
      ("q", q_block, True),
      ("k", k_block, True),
      ("v", None, False),
    ):
      call = functools.partial(quantize_fp8, block_rows=block_rows, signs=signs if rotate else None)
      ms = time_ms(call, x, iterations=iterations)
      x8, descale = jax.eval_shape(call, x)
      moved = x.nbytes + x8.size * x8.dtype.itemsize + descale.size * 4
      gbps = moved / ms / 1e6
      records.append(
        dict(
          part="quantizer",
          impl=impl_label("jax_fa3_fp8_quantize"),
          mode="quantize",
          tensor=tensor,
          block_rows=block_rows,
          hadamard=rotate,
          dtype=FP8,
          input_dtype="bfloat16",
          head_dim=problem.head_dim,
          batch=problem.batch,
          heads=problem.heads,
          seqlen_q=problem.seqlen,
          ms=ms,
          gbps=gbps,
          card=card,
        )
      )
      print(
        f"[q{index:2}/{len(seen)}] quantize_fp8 {tensor} block_rows={block_rows!s:5} d={problem.head_dim:<3} "
        f"seqlen={problem.seqlen:<5} batch={problem.batch:<3} {ms:9.4f} ms {gbps:8.4g} GB/s",
        flush=True,
      )
      on_record(records)
  return records


def _cell(value, digits=None):
  """A table cell: "-" for none; whole numbers from 10 up, else two significant digits,
  unless `digits` (decimals) is given."""
  if value is None:
    return "-"
  if digits is not None:
    return f"{value:.{digits}f}"
  return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def markdown(records, header):
  lines = [
    f"# FP8 attention forward: {header}",
    "",
    "TFLOP/s (4 b h s^2 d, halved when causal). jax_fa3: the FP8 kernel on pre-quantized inputs; "
    "fp8_attention: end to end on bf16 inputs, quantization included (at head dim 64 with "
    "its default split_kv: k and v as value + residual through the d128 kernel, which the "
    "quantization ms column then includes). cuDNN FP8 writes e4m3, jax_fa3 bf16.",
    "",
  ]
  rows = [r for r in records if r["part"] == "attention"]
  tflops = {(r["head_dim"], r["causal"], r["seqlen_q"], r["impl"]): r["tflops"] for r in rows}
  labels = list(dict.fromkeys(r["impl"] for r in rows))
  ms = {(r["head_dim"], r["causal"], r["seqlen_q"], r["impl"]): r["ms"] for r in rows}
  ours, cudnn, e2e, bf16 = (
    impl_label(i) for i in ("jax_fa3", "cudnn_fp8", "jax_fa3_fp8_attention", "jax_fa3_bf16")
  )
  lines += [
    "| head dim | causal | seqlen | "
    + " | ".join(labels)
    + " | jax_fa3 / cudnn_fp8 (>= 1.05 at 8k+) "
    "| fp8_attention / bf16 speed (> 1 at 4k+) | quantization ms |",
    "|---|---|---|" + "---|" * (len(labels) + 3),
  ]
  for size in sorted({key[:3] for key in tflops}):
    cells = [_cell(tflops.get((*size, label))) for label in labels]
    ratio = tflops.get((*size, ours)), tflops.get((*size, cudnn))
    speed = ms.get((*size, bf16)), ms.get((*size, e2e))
    quantization = ms.get((*size, e2e)), ms.get((*size, ours))
    lines.append(
      f"| {size[0]} | {'yes' if size[1] else 'no'} | {size[2]} | "
      + " | ".join(cells)
      + f" | {_cell(ratio[0] / ratio[1] if all(ratio) else None, 3)}"
      + f" | {_cell(speed[0] / speed[1] if all(speed) else None, 3)}"
      + f" | {_cell(quantization[0] - quantization[1] if all(quantization) else None, 3)} |"
    )
  d256 = tflops.get((256, False, 16384, ours))
  if d256:
    lines += [
      "",
      f"d256 non-causal 16k, jax_fa3: {d256:.0f} TFLOP/s (target >= {TARGET_D256_16K}).",
    ]
  quant = [r for r in records if r["part"] == "quantizer"]
  if quant:
    lines += [
      "",
      "## The quantizer alone (quantize_fp8 as fp8_attention calls it; GB/s of x read once, "
      "x8 and descale written)",
      "",
      "| head dim | seqlen | batch | tensor | block rows | Hadamard | ms | GB/s |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(quant, key=lambda r: (r["head_dim"], r["seqlen_q"], r["tensor"])):
      lines.append(
        f"| {r['head_dim']} | {r['seqlen_q']} | {r['batch']} | {r['tensor']} | {r['block_rows']} | "
        f"{'yes' if r['hadamard'] else 'no'} | {r['ms']:.4f} | {_cell(r['gbps'])} |"
      )
  return "\n".join(lines) + "\n"


def plot(records, header, out_dir):
  """TFLOP/s against seqlen, a row per head dim, causal or not side by side."""
  plt = pyplot()
  rows = [r for r in records if r["part"] == "attention"]
  if plt is None or not rows:
    return []
  head_dims = sorted({r["head_dim"] for r in rows})
  masks = sorted({r["causal"] for r in rows})
  fig, axes = plt.subplots(
    len(head_dims),
    len(masks),
    figsize=(5.5 * len(masks), 3.4 * len(head_dims)),
    squeeze=False,
    sharex=True,
  )
  seqlens = sorted({r["seqlen_q"] for r in rows})
  for (row, head_dim), (col, causal) in itertools.product(enumerate(head_dims), enumerate(masks)):
    ax = axes[row][col]
    for label in dict.fromkeys(r["impl"] for r in rows):
      points = sorted(
        (r["seqlen_q"], r["tflops"])
        for r in rows
        if r["impl"] == label and r["head_dim"] == head_dim and r["causal"] == causal
      )
      if points:
        ax.plot(*zip(*points), marker="o", label=label, linestyle="--" if "bf16" in label else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens, [str(s) for s in seqlens])
    ax.set_title(f"head dim {head_dim}, {'causal' if causal else 'not causal'}")
    ax.set_ylabel("TFLOP/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel("seqlen (batch x seqlen = 16k)")
  fig.suptitle(f"FP8 forward: {header}", fontsize=9)
  fig.tight_layout()
  path = out_dir / "fp8.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--head-dims", type=int, nargs="+", help="default: 128 256 (64 optional)")
  parser.add_argument("--seqlens", type=int, nargs="+", help="default: 1024 ... 16384")
  parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
  parser.add_argument(
    "--impls", nargs="*", choices=IMPLS, default=IMPLS, help="none given: the quantizer alone"
  )
  parser.add_argument("--iterations", type=int, help="timed runs per point (default 20 on a GPU)")
  parser.add_argument(
    "--quick", action="store_true", help="seqlens 4096 and 16384 only, 10 runs per point"
  )
  parser.add_argument("--no-quantizer", action="store_true", help="skip timing the quantizer alone")
  parser.add_argument(
    "--out", type=pathlib.Path, help="output folder (default benchmarks/results/<date>_<card>)"
  )
  args = parser.parse_args(argv)
  check_fp8_api()
  gpu = on_gpu()
  if not gpu:
    print(NO_GPU_BANNER)
  head_dims = args.head_dims or ((128, 256) if gpu else (64,))
  seqlens = args.seqlens or (
    ((4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384)) if gpu else (128, 256)
  )
  iterations = args.iterations or ((10 if args.quick else 20) if gpu else 2)
  causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
  card = card_name()
  print(jax_fa3.kernels_available())
  print(f"card: {card}; {timing_method(iterations)}; jax {jax.__version__}", flush=True)
  out_dir = args.out or default_out_dir(card)
  out_dir.mkdir(parents=True, exist_ok=True)
  save = lambda records: (out_dir / "fp8.json").write_text(json.dumps(records, indent=1))
  problem_list = problems(head_dims, seqlens, causal, gpu)
  records = run(problem_list, args.impls, iterations, card, save)
  if not args.no_quantizer:
    records = run_quantizer(problem_list, iterations, card, records, save)
  save(records)
  header = results_header(card, FP8, iterations)
  table = markdown(records, header)
  (out_dir / "fp8.md").write_text(table)
  print("\n" + table)
  print(
    "wrote",
    [str(p) for p in [out_dir / "fp8.json", out_dir / "fp8.md", *plot(records, header, out_dir)]],
  )
  if not gpu:
    print(NO_GPU_BANNER)


if __name__ == "__main__":
  main()
