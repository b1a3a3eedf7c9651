"""Multi-GPU scaling of jax_fa3 on sharded arrays: ring attention, batch and head splits.

Sweeps, on 1, 2, 4, ... of the visible devices (--devices):
- ring: one long sequence split over the devices (context parallelism), through
  `flash_attention` under jit: time against seqlen and device count, causal and not, for
  each of --strategies (ring attention, all-gathered K/V: `context_parallel=`), with the
  cost model's estimate of each (jax_fa3/strategy.py, a forward) and the strategy "auto"
  picks, so that one run says whether the model picks the faster one;
- layout: the causal ring striped (load-balanced, what jax_fa3 picks) against contiguous,
  forward and backward apart: the balancing gain, expected (2P - 1) / P on P devices
  (ring.py);
- batch, heads: a fixed problem split over the batch or the heads (data and tensor
  parallelism), which needs no communication: efficiency t(1) / (P t(P)), ideally 1;
- packed: one row of --packed-seqlens tokens (32k) holding documents of ~--mean-doc
  tokens (2k; uniform in [mean/4, 7 mean/4], as benchmarks/packed.py makes them) with
  segment ids, the sequence split over the devices, for each of --strategies: the
  contiguous ring whose K/V chunks carry their rows and which skips the blocks of other
  documents, or K/V gathered with their rows. TFLOP/s count the in-document work only
  ("useful", as in packed.py).

Timing: wall-clock time of the jitted call, median of --iterations (timing.wall_time_ms).
Not CUPTI kernel time: a sharded call costs what its slowest device takes, plus the
communication it waits for, which a sum of kernel times does not show.
FLOPs as in bench.py (fwd 4 B H S^2 D, halved when causal; bwd 2.5x, fwdbwd 3.5x), and
TFLOP/s are per device.

NVLink multicast stays off: the script sets NCCL_NVLS_ENABLE=0 before JAX starts NCCL,
whatever the environment says. On shared multi-GPU hosts a program that uses NVLS can
put the host's GPUs out of service, and this sweep needs none of it.

A point that fails is reported, not dropped: its error is printed, listed in scaling.json
("failures") and at the top of scaling.md, and the script exits with status 1 at the end.

Writes scaling.json and scaling.md to benchmarks/results/<date>_<card>-x<devices>/ (or
--out), after every point, so that a run cut short keeps what it measured, and at the end
scaling.png (with matplotlib; --replot draws it from a scaling.json afterwards). Without a
GPU it runs small sizes on the CPU devices, say
XLA_FLAGS=--xla_force_host_platform_device_count=8, to check the plumbing.

    python benchmarks/scaling.py --sweeps ring layout --seqlens 8192 32768 131072 \
      --strategies ring all_gather
"""

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before JAX loads NCCL; see above

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import functools
import itertools
import json
import pathlib

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_fa3
from bench import NO_GPU_BANNER, Problem, card_name, default_out_dir, pyplot, timed_call
from packed import Packed
from jax_fa3 import sharding, strategy
from jax_fa3.primitives import AttentionParams
from timing import on_gpu, wall_time_ms

SWEEPS = ("ring", "layout", "batch", "heads", "packed")
STRATEGIES = ("ring", "all_gather")  # the sequence's (context_parallel), "auto" excepted


@dataclasses.dataclass(frozen=True)
class Sizes:
  seqlens: tuple[int, ...]  # ring and layout: batch 1, `heads` heads of `head_dim`
  heads: int
  head_dim: int
  split_problem: Problem  # batch and heads: the fixed problem to split (its causal is ignored)
  iterations: int
  packed_seqlens: tuple[int, ...] = ()  # packed: one row of this many tokens
  mean_doc: int = 0  # packed: the documents' mean length


GPU_SIZES = Sizes(
  (8192, 16384, 32768, 65536, 131072),
  16,
  128,
  Problem(16, 4096, 16, 128, False, "bfloat16"),
  10,
  (32768,),
  2048,
)
CPU_SIZES = Sizes((256, 512), 2, 32, Problem(8, 256, 8, 32, False, "bfloat16"), 2, (256,), 32)


@dataclasses.dataclass(frozen=True)
class Point:
  """One timed configuration."""

  sweep: str
  mode: str
  split: str  # what is split over the devices ("sequence", "batch", "heads")
  layout: str  # the ring's layout, or "-"
  devices: int
  problem: Problem
  mean_doc: int = 0  # packed documents' mean length; 0: not packed
  strategy: str = "-"  # ring and packed sweeps on several devices: context_parallel

  def packed(self) -> Packed:
    problem = self.problem
    return Packed(
      problem.seqlen,
      self.mean_doc,
      problem.head_dim,
      problem.heads,
      problem.causal,
      problem.batch,
      problem.dtype,
    )

  def flops(self):
    """The problem's FLOPs for the mode; packed, the in-document ones only."""
    if self.mean_doc:
      return self.packed().useful_flops(f"packed_{self.mode}")
    return self.problem.flops(self.mode)


def ring_points(sizes, device_counts, dtype, strategies=STRATEGIES):
  """One device once, then each strategy on each device count."""
  for seqlen, causal, devices in itertools.product(sizes.seqlens, (False, True), device_counts):
    problem = Problem(1, seqlen, sizes.heads, sizes.head_dim, causal, dtype)
    for mode, context_parallel in itertools.product(("fwd", "fwdbwd"), _each(strategies, devices)):
      layout = _layout_chosen(problem, devices, context_parallel)
      yield Point("ring", mode, "sequence", layout, devices, problem, strategy=context_parallel)


def _each(strategies, devices):
  """The strategies to time on `devices` devices: one device has none ("-")."""
  return strategies if devices > 1 else ("-",)


def _split_chosen(problem, devices, context_parallel="auto"):
  shape = (problem.batch, problem.seqlen, problem.heads, problem.head_dim)
  return sharding.choose_split(
    {"x": devices},
    P(None, "x"),
    P(None, "x"),
    shape,
    shape,
    _params(problem),
    packed=False,
    context_parallel=context_parallel,
  )


def _layout_chosen(problem, devices, context_parallel="auto"):
  """The strategy and layout jax_fa3 runs for this problem on `devices` devices."""
  split = _split_chosen(problem, devices, "auto" if context_parallel == "-" else context_parallel)
  if not split.sequence:
    return "-"
  if split.strategy == "ring":
    return "ring " + ("striped" if split.striped else "contiguous")
  return "all_gather " + ("zigzag" if split.zigzag else "contiguous")


def _model(point):
  """The cost model's view of a ring point: its estimate for the point's strategy (a forward,
  ms) and the strategy "auto" picks."""
  if point.sweep != "ring" or point.strategy == "-":
    return {}
  problem = point.problem
  shape = (problem.batch, problem.seqlen, problem.heads, problem.head_dim)
  ring_ms, gather_ms = strategy.costs(
    point.devices,
    shape,
    shape,
    _params(problem),
    _split_chosen(problem, point.devices, "ring").striped,
    _split_chosen(problem, point.devices, "all_gather").zigzag,
  )
  return dict(
    model_fwd_ms=ring_ms if point.strategy == "ring" else gather_ms,
    auto_picks=_split_chosen(problem, point.devices).strategy,
  )


def _params(problem):
  return AttentionParams(
    softmax_scale=problem.head_dim**-0.5, window_right=0 if problem.causal else -1
  )


def layout_points(sizes, device_counts, dtype):
  for seqlen, devices in itertools.product(sizes.seqlens, device_counts):
    if devices > 1 and seqlen % devices**2 == 0:
      problem = Problem(1, seqlen, sizes.heads, sizes.head_dim, True, dtype)
      for mode, layout in itertools.product(("fwd", "bwd"), ("striped", "contiguous")):
        yield Point("layout", mode, "sequence", layout, devices, problem)


def packed_points(sizes, device_counts, dtype, strategies=STRATEGIES):
  for seqlen, causal, devices in itertools.product(
    sizes.packed_seqlens, (False, True), device_counts
  ):
    problem = Problem(1, seqlen, sizes.heads, sizes.head_dim, causal, dtype)
    for mode, context_parallel in itertools.product(("fwd", "fwdbwd"), _each(strategies, devices)):
      yield Point(
        "packed",
        mode,
        "sequence",
        f"docs~{sizes.mean_doc} {context_parallel}",
        devices,
        problem,
        sizes.mean_doc,
        context_parallel,
      )


def split_points(sweep, sizes, device_counts, dtype):
  problem = dataclasses.replace(sizes.split_problem, dtype=dtype)
  size = problem.batch if sweep == "batch" else problem.heads
  for devices, mode in itertools.product(device_counts, ("fwd", "fwdbwd")):
    if size % devices == 0:
      yield Point(sweep, mode, sweep, "-", devices, problem)


def timed(point):
  """The function to time for `point` and its arguments, placed on the devices."""
  mesh = jax.make_mesh(
    (point.devices,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[: point.devices]
  )
  spec = {"sequence": P(None, "x"), "batch": P("x"), "heads": P(None, None, "x")}[point.split]
  q, k, v, dout = (
    jax.device_put(x, NamedSharding(mesh, spec)) for x in point.problem.inputs(point.problem.dtype)
  )
  if point.sweep == "layout":
    return _ring_program(point, mesh, q, k, v, dout)
  if point.sweep == "packed":
    return _packed_program(point, mesh, q, k, v, dout)
  attention = functools.partial(
    jax_fa3.flash_attention, causal=point.problem.causal, **_context_parallel(point)
  )
  return timed_call(attention, point.mode, q, k, v, dout)


def _context_parallel(point):
  return {} if point.strategy == "-" else dict(context_parallel=point.strategy)


def _ring_program(point, mesh, q, k, v, dout):
  """The forward or the backward of the causal ring in the point's layout, run directly
  (jax_fa3 itself always stripes a causal ring that it can)."""
  split = sharding.Split(sequence=("x",), striped=point.layout == "striped")
  params, sizes = _params(point.problem), dict(mesh.shape)
  seq, lse = split.q_spec(), split.lse_spec()

  # No lengths (None): an empty array must not enter a manual computation (NOTES).
  def forward(q, k, v):
    return sharding.local_fwd(split, sizes, params, False, None, q, k, v, None, None)

  def backward(dout, q, k, v, out, lse):
    return sharding.local_bwd(split, sizes, params, False, dout, q, k, v, out, lse, None, None)

  forward = jax.shard_map(forward, mesh=mesh, in_specs=(seq, seq, seq), out_specs=(seq, lse))
  if point.mode == "fwd":
    return forward, (q, k, v)
  out, lse_value = jax.jit(forward)(q, k, v)
  backward = jax.shard_map(backward, mesh=mesh, in_specs=(seq,) * 5 + (lse,), out_specs=(seq,) * 3)
  return backward, (dout, q, k, v, out, lse_value)


def _packed_program(point, mesh, q, k, v, dout):
  """flash_attention with the point's segment ids, split over the sequence like q."""
  ids = jax.device_put(point.packed().segment_ids(), NamedSharding(mesh, P(None, "x")))

  def attention(q, k, v, ids):
    return jax_fa3.flash_attention(
      q, k, v, segment_ids=ids, causal=point.problem.causal, **_context_parallel(point)
    )

  if point.mode == "fwd":
    return attention, (q, k, v, ids)

  def forward_and_backward(q, k, v, dout, ids):
    return jax.vjp(lambda q, k, v: attention(q, k, v, ids), q, k, v)[1](dout)

  return forward_and_backward, (q, k, v, dout, ids)


def run(points, iterations, on_record=lambda records, failures: None):
  """Times each point; returns (records, failures). A point that fails is not dropped: it
  goes into `failures` with its error, and the run goes on. `on_record(records, failures)`
  runs after each point, so that a run cut short keeps what it measured."""
  records, failures, baseline = [], [], {}
  for index, point in enumerate(points, 1):
    problem = point.problem
    prefix = (
      f"[{index:3}/{len(points)}] {point.sweep:6} {point.mode:6} {point.layout:10} "
      f"P={point.devices} causal={problem.causal!s:5} seqlen={problem.seqlen:<6} "
      f"batch={problem.batch:<3} heads={problem.heads}"
    )
    try:
      fn, args = timed(point)
      ms = wall_time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
      print(f"{prefix} FAILED: {error}", flush=True)
      failures.append(dict(_fields(point), error=error))
      on_record(records, failures)
      continue
    key = (point.sweep, point.mode, point.layout if point.sweep == "layout" else "", problem)
    if point.devices == 1:
      baseline[key] = ms
    one_device = baseline.get(key)
    records.append(
      dict(
        _fields(point),
        ms=ms,
        tflops_per_device=point.flops() / ms / 1e9 / point.devices,
        speedup=one_device / ms if one_device else None,
        efficiency=one_device / ms / point.devices if one_device else None,
        **_model(point),
      )
    )
    print(
      f"{prefix} {ms:10.3f} ms {records[-1]['tflops_per_device']:8.3g} TFLOP/s/device", flush=True
    )
    on_record(records, failures)
  return records, failures


def _fields(point):
  problem = point.problem
  packed = dict(mean_doc_len=point.mean_doc) if point.mean_doc else {}
  return dict(
    sweep=point.sweep,
    mode=point.mode,
    split=point.split,
    layout=point.layout,
    strategy=point.strategy,
    devices=point.devices,
    batch=problem.batch,
    seqlen=problem.seqlen,
    heads=problem.heads,
    head_dim=problem.head_dim,
    causal=problem.causal,
    dtype=problem.dtype,
    **packed,
  )


def markdown(records, header, failures=()):
  lines = [f"# Scaling: {header}", ""]
  if failures:
    lines += [
      f"## FAILED: {len(failures)} points, not measured",
      "",
      "| sweep | mode | layout | causal | seqlen | batch | heads | devices | error |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
      f"| {f['sweep']} | {f['mode']} | {f['layout']} | {'yes' if f['causal'] else 'no'} | "
      f"{f['seqlen']} | {f['batch']} | {f['heads']} | {f['devices']} | "
      f"{f['error'].replace('|', '/')} |"
      for f in failures
    ]
    lines.append("")
  for sweep in SWEEPS:
    rows = [r for r in records if r["sweep"] == sweep]
    if not rows:
      continue
    lines += [
      f"## {sweep}",
      "",
      "| mode | layout | causal | seqlen | batch | heads | devices | ms | "
      "TFLOP/s/device | speed-up | efficiency |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
      rows, key=lambda r: (r["mode"], r["layout"], r["causal"], r["seqlen"], r["devices"])
    ):
      lines.append(
        f"| {r['mode']} | {r['layout']} | {'yes' if r['causal'] else 'no'} | "
        f"{r['seqlen']} | {r['batch']} | {r['heads']} | {r['devices']} | "
        f"{r['ms']:.3f} | {r['tflops_per_device']:.3g} | {_ratio(r['speedup'])} | "
        f"{_ratio(r['efficiency'])} |"
      )
    lines.append("")
  lines += _striping_gains(records)
  lines += _strategies(records)
  return "\n".join(lines)


def striping_gains(records):
  """The layout sweep's contiguous time over its striped time: (mode, seqlen, devices,
  gain) for each point measured both ways."""
  ms = {
    (r["mode"], r["seqlen"], r["devices"], r["layout"]): r["ms"]
    for r in records
    if r["sweep"] == "layout"
  }
  return [
    (mode, seqlen, devices, ms[mode, seqlen, devices, "contiguous"] / striped)
    for (mode, seqlen, devices, layout), striped in sorted(ms.items())
    if layout == "striped" and (mode, seqlen, devices, "contiguous") in ms
  ]


def _striping_gains(records):
  """The striping gains as a markdown table, beside (2P - 1) / P."""
  rows = [
    f"| {mode} | {seqlen} | {devices} | {gain:.2f} | {(2 * devices - 1) / devices:.2f} |"
    for mode, seqlen, devices, gain in striping_gains(records)
  ]
  if not rows:
    return []
  return [
    "## striping gain (causal): contiguous ms / striped ms",
    "",
    "| mode | seqlen | devices | measured | expected (2P - 1) / P |",
    "|---|---|---|---|---|",
    *rows,
    "",
  ]


def _strategies(records):
  """The ring sweep's strategies side by side, with the cost model's forward estimates and
  its pick: the table that sets (or moves) strategy.py's constants."""
  ms = {}
  for r in records:
    if r["sweep"] == "ring" and r.get("strategy", "-") != "-":
      ms.setdefault((r["mode"], r["causal"], r["seqlen"], r["devices"]), {})[r["strategy"]] = r
  rows = []
  for (mode, causal, seqlen, devices), by_strategy in sorted(ms.items()):
    if set(by_strategy) != set(STRATEGIES):
      continue
    ring, gather = by_strategy["ring"], by_strategy["all_gather"]
    faster = "ring" if ring["ms"] < gather["ms"] else "all_gather"
    rows.append(
      f"| {mode} | {'yes' if causal else 'no'} | {seqlen} | {devices} | {ring['ms']:.3f} | "
      f"{gather['ms']:.3f} | {faster} | {ring['auto_picks']} | "
      f"{ring['model_fwd_ms']:.4g} | {gather['model_fwd_ms']:.4g} |"
    )
  if not rows:
    return []
  return [
    "## strategy: ring against all-gather (measured; the cost model's forward estimate)",
    "",
    (
      "| mode | causal | seqlen | devices | ring ms | all-gather ms | faster | auto picks | "
      "model ring ms | model all-gather ms |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
  ]


def _ratio(x):
  return "-" if x is None else f"{x:.2f}"


def plot(records, header, out_dir):
  """scaling.png: the ring's TFLOP/s per device against seqlen (fwd, fwdbwd), the striping
  gain against (2P - 1) / P, and the batch/heads efficiency. Needs matplotlib."""
  plt = pyplot()
  if plt is None:
    return []
  ring = [r for r in records if r["sweep"] == "ring"]
  gains = striping_gains(records)
  splits = [r for r in records if r["sweep"] in ("batch", "heads") and r["efficiency"]]
  panels = [("ring", mode) for mode in ("fwd", "fwdbwd") if any(r["mode"] == mode for r in ring)]
  panels += [("layout", None)] * bool(gains) + [("split", None)] * bool(splits)
  if not panels:
    return []
  columns = min(2, len(panels))
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
  for ax in axes.flat[len(panels) :]:
    ax.set_visible(False)
  for ax, (panel, mode) in zip(axes.flat, panels):
    if panel == "ring":
      lines = sorted({(r["devices"], r["causal"], r.get("strategy", "-")) for r in ring})
      for devices, causal, context_parallel in lines:
        points = sorted(
          (r["seqlen"], r["tflops_per_device"])
          for r in ring
          if (r["mode"], r["devices"], r["causal"], r.get("strategy", "-"))
          == (mode, devices, causal, context_parallel)
        )
        how = "" if context_parallel == "-" else f", {context_parallel}"
        if points:
          ax.plot(
            *zip(*points),
            marker="o",
            linestyle="-" if causal else "--",
            label=f"{devices} device{'s' * (devices > 1)}{how}, "
            f"{'causal' if causal else 'not causal'}",
          )
      _seqlen_axis(ax, {r["seqlen"] for r in ring})
      ax.set(
        title=f"sequence split (ring, all-gather), {mode}",
        xlabel="seqlen (batch 1)",
        ylabel="TFLOP/s per device",
      )
    elif panel == "layout":
      colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
      for index, devices in enumerate(sorted({g[2] for g in gains})):
        color = colors[index % len(colors)]
        for mode_, style in (("fwd", "-"), ("bwd", "--")):
          points = sorted((g[1], g[3]) for g in gains if (g[0], g[2]) == (mode_, devices))
          if points:
            ax.plot(
              *zip(*points),
              marker="o",
              color=color,
              linestyle=style,
              label=f"{mode_}, {devices} devices",
            )
        ax.axhline((2 * devices - 1) / devices, color=color, linestyle=":", linewidth=1)
      _seqlen_axis(ax, {g[1] for g in gains})
      ax.set(
        title="causal ring: contiguous ms / striped ms\n(dotted: (2P - 1) / P)",
        xlabel="seqlen",
        ylabel="speed-up of striping",
      )
    else:
      for sweep, mode_ in sorted({(r["sweep"], r["mode"]) for r in splits}):
        points = sorted(
          (r["devices"], r["efficiency"])
          for r in splits
          if (r["sweep"], r["mode"]) == (sweep, mode_)
        )
        ax.plot(*zip(*points), marker="o", label=f"{sweep} split, {mode_}")
      ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
      ax.set_xscale("log", base=2)
      devices = sorted({r["devices"] for r in splits})
      ax.set_xticks(devices, [str(d) for d in devices])
      ax.set(title="batch / heads split: t(1) / (P t(P))", xlabel="devices", ylabel="efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(header, fontsize=8)
  fig.tight_layout()
  path = out_dir / "scaling.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def _seqlen_axis(ax, seqlens):
  seqlens = sorted(seqlens)
  ax.set_xscale("log", base=2)
  ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
  ax.minorticks_off()


def write(out_dir, header, records, failures=(), with_plot=False):
  """scaling.json and scaling.md (and scaling.png) in `out_dir`, failed points included;
  returns their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "scaling.json").write_text(
    json.dumps(dict(header=header, records=records, failures=list(failures)), indent=1)
  )
  (out_dir / "scaling.md").write_text(markdown(records, header, failures))
  return [out_dir / "scaling.json", out_dir / "scaling.md"] + (
    plot(records, header, out_dir) if with_plot else []
  )


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=SWEEPS)
  parser.add_argument(
    "--devices", type=int, nargs="+", help="device counts (default: 1, 2, 4, ... up to all visible)"
  )
  parser.add_argument(
    "--seqlens",
    type=int,
    nargs="+",
    help="ring and layout sweeps (default: 8192 ... 131072 on GPUs)",
  )
  parser.add_argument(
    "--packed-seqlens",
    type=int,
    nargs="+",
    help="packed sweep: row lengths (default 32768 on GPUs)",
  )
  parser.add_argument(
    "--mean-doc", type=int, help="packed sweep: mean document length (default 2048 on GPUs)"
  )
  parser.add_argument(
    "--strategies",
    nargs="+",
    choices=STRATEGIES,
    default=STRATEGIES,
    help="ring and packed sweeps: how a split sequence runs (flash_attention's "
    "context_parallel), each timed (default: both)",
  )
  parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
  parser.add_argument("--iterations", type=int, help="timed runs per point (default 10 on GPUs)")
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    help="output folder (default benchmarks/results/<date>_<card>-x<devices>)",
  )
  parser.add_argument(
    "--replot",
    type=pathlib.Path,
    metavar="SCALING_JSON",
    help="run nothing: rewrite scaling.md and scaling.png beside this "
    "scaling.json (say, of a run cut short)",
  )
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.replot:
    results = json.loads(args.replot.read_text())
    written = write(
      args.replot.parent,
      results["header"],
      results["records"],
      results.get("failures", ()),
      with_plot=True,
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return
  if not on_gpu():
    print(NO_GPU_BANNER)
  sizes = GPU_SIZES if on_gpu() else CPU_SIZES
  if args.seqlens:
    sizes = dataclasses.replace(sizes, seqlens=tuple(args.seqlens))
  if args.packed_seqlens:
    sizes = dataclasses.replace(sizes, packed_seqlens=tuple(args.packed_seqlens))
  if args.mean_doc:
    sizes = dataclasses.replace(sizes, mean_doc=args.mean_doc)
  visible = len(jax.devices())
  device_counts = sorted(args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= visible])
  if max(device_counts) > visible:
    raise SystemExit(f"--devices asks for {max(device_counts)} devices; {visible} are visible")
  iterations = args.iterations or sizes.iterations
  points = []
  for sweep in args.sweeps:
    if sweep == "ring":
      points += ring_points(sizes, device_counts, args.dtype, tuple(args.strategies))
    elif sweep == "layout":
      points += layout_points(sizes, device_counts, args.dtype)
    elif sweep == "packed":
      points += packed_points(sizes, device_counts, args.dtype, tuple(args.strategies))
    else:
      points += split_points(sweep, sizes, device_counts, args.dtype)

  card = card_name()
  header = (
    f"{card} x{max(device_counts)}, {args.dtype}, jax {jax.__version__}, "
    f"wall-clock time (median of {iterations} runs), "
    f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']}"
  )
  if not on_gpu():
    header += "; NO GPU: float32 reference path on CPU devices"
  print(jax_fa3.kernels_available())
  print(header, flush=True)

  out_dir = args.out or default_out_dir(f"{card} x{max(device_counts)}")
  records, failures = run(
    points, iterations, lambda records, failures: write(out_dir, header, records, failures)
  )

  written = write(out_dir, header, records, failures, with_plot=True)
  print("\n" + markdown(records, header, failures))
  print("wrote " + ", ".join(str(p) for p in written))
  if failures:
    raise SystemExit(
      f"scaling: {len(failures)} of {len(points)} points failed (listed above and in scaling.md)"
    )


if __name__ == "__main__":
  main()
