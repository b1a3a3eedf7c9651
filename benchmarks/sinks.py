"""Attention sinks: what they cost in the kernels, and the gpt-oss-shaped layer against XLA.

Two parts, on the same inputs in one run:
- overhead: `flash_attention(sinks=...)` against the same call without sinks (impls
  `jax_fa3_sinks` and `jax_fa3`), head dims 64 and 128, 2k-16k tokens (16k tokens per
  problem), full, causal and a 128-token causal window;
- gpt-oss: head dim 64, 64 query / 8 KV heads, 8k tokens, the sliding (128) and the full
  causal layer, jax_fa3 with sinks against attention with sinks written in JAX and run by
  XLA (`xla_sinks`: the sink is a last score column, dropped after the softmax).

Writes sinks.json, sinks.md and sinks.png to benchmarks/results/<date>_<card>/ (or --out).

    python benchmarks/sinks.py --head-dims 64 --seqlens 8192
"""

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp

import jax_fa3
from bench import card_name, default_out_dir, pyplot, results_header
from timing import on_gpu, time_ms

MODES = ("fwd", "fwdbwd")
FLOP_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
MASKS = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window128": (True, (128, 0))}


@dataclasses.dataclass(frozen=True)
class Problem:
  part: str  # "overhead" or "gpt-oss"
  head_dim: int
  seqlen: int
  heads: int
  kv_heads: int
  batch: int
  mask: str

  def flops(self, mode):
    """Attention FLOPs actually needed under the mask (4 h d per visible pair)."""
    causal, (left, _) = MASKS[self.mask]
    if left >= 0:
      pairs = sum(min(i, left) + 1 for i in range(self.seqlen))
    else:
      pairs = self.seqlen * (self.seqlen + 1) / 2 if causal else self.seqlen**2
    return FLOP_FACTOR[mode] * 4 * self.batch * self.heads * self.head_dim * pairs

  def inputs(self):
    keys = jax.random.split(jax.random.key(self.seqlen + self.head_dim), 5)
    q = jax.random.normal(
      keys[0], (self.batch, self.seqlen, self.heads, self.head_dim), jnp.bfloat16
    )
    k, v = (
      jax.random.normal(key, (self.batch, self.seqlen, self.kv_heads, self.head_dim), jnp.bfloat16)
      for key in keys[1:3]
    )
    dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    sinks = jax.random.normal(keys[4], (self.heads,), jnp.float32)
    return q, k, v, dout, sinks


def xla_attention_with_sinks(q, k, v, sinks, causal, window):
  """Attention with sinks in plain JAX: the sink is one more score column, dropped after the softmax."""
  heads, kv_heads = q.shape[2], k.shape[2]
  k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  scores = (
    jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[3] ** -0.5
  )
  i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
  visible = jnp.ones(scores.shape[2:], bool)
  if causal:
    visible &= j <= i
  if window[0] >= 0:
    visible &= j >= i - window[0]
  scores = jnp.where(visible, scores, -jnp.inf)
  sink = jnp.broadcast_to(sinks[None, :, None, None], (*scores.shape[:3], 1))
  probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def attention_fn(impl, problem):
  causal, window = MASKS[problem.mask]
  if impl == "xla_sinks":
    return lambda q, k, v, s: xla_attention_with_sinks(q, k, v, s, causal, window)
  with_sinks = impl == "jax_fa3_sinks"
  return lambda q, k, v, s: jax_fa3.flash_attention(
    q, k, v, causal=causal, window_size=window, sinks=s if with_sinks else None
  )


def problems(head_dims, seqlens, gpu):
  tokens = 16384 if gpu else 512
  found = [
    Problem(
      "overhead", d, n, 2048 // d if gpu else 4, 2048 // d if gpu else 4, max(1, tokens // n), mask
    )
    for d, n, mask in itertools.product(head_dims, seqlens, MASKS)
  ]
  gpt_oss_len = 8192 if gpu else 256
  found += [Problem("gpt-oss", 64, gpt_oss_len, 64, 8, 1, mask) for mask in ("window128", "causal")]
  return found


def impls_of(problem):
  if problem.part == "overhead":
    return ("jax_fa3", "jax_fa3_sinks")
  return ("jax_fa3_sinks", "xla_sinks")


def run(problem_list, modes, iterations, card, on_record):
  records = []
  steps = [(p, m, i) for p in problem_list for m in modes for i in impls_of(p)]
  for index, (problem, mode, impl) in enumerate(steps, 1):
    prefix = (
      f"[{index:3}/{len(steps)}] {problem.part:8} {impl:14} {mode:6} d={problem.head_dim:<3} "
      f"{problem.mask:9} seqlen={problem.seqlen:<5} batch={problem.batch}"
    )
    q, k, v, dout, sinks = problem.inputs()
    attention = attention_fn(impl, problem)
    if mode == "fwd":
      fn, args = attention, (q, k, v, sinks)
    else:
      fn = lambda q, k, v, s, dout, attention=attention: jax.vjp(attention, q, k, v, s)[1](dout)
      args = (q, k, v, sinks, dout)
    try:
      ms = time_ms(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      if impl.startswith("jax_fa3"):
        raise
      print(f"{prefix} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
      continue
    tflops = problem.flops(mode) / ms / 1e9
    records.append(
      dict(
        part=problem.part,
        impl=impl,
        mode=mode,
        dtype="bfloat16",
        head_dim=problem.head_dim,
        seqlen_q=problem.seqlen,
        seqlen_k=problem.seqlen,
        heads=problem.heads,
        kv_heads=problem.kv_heads,
        batch=problem.batch,
        mask=problem.mask,
        ms=ms,
        tflops=tflops,
        card=card,
      )
    )
    print(f"{prefix} {ms:9.3f} ms {tflops:8.3g} TFLOP/s", flush=True)
    on_record(records)
  return records


def markdown(records, header):
  lines = [f"# Attention sinks: {header}", ""]
  ms = {
    (r["part"], r["mode"], r["head_dim"], r["mask"], r["seqlen_q"], r["impl"]): r["ms"]
    for r in records
  }
  lines += [
    "## Cost of sinks (time with sinks / time without; target <= 1.02 fwd, <= 1.03 fwd+bwd)",
    "",
    "| mode | head dim | mask | seqlen | without (ms) | with (ms) | ratio |",
    "|---|---|---|---|---|---|---|",
  ]
  for key in sorted({k[:5] for k in ms if k[0] == "overhead"}):
    plain, sinks = ms.get((*key, "jax_fa3")), ms.get((*key, "jax_fa3_sinks"))
    if plain and sinks:
      lines.append(
        f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {plain:.3f} | {sinks:.3f} | {sinks / plain:.3f} |"
      )
  lines += [
    "",
    "## gpt-oss-shaped layer (d64, 64/8 heads, sinks; target: jax_fa3 >= 5x XLA)",
    "",
    "| mode | mask | seqlen | jax_fa3 (ms) | XLA (ms) | speed-up |",
    "|---|---|---|---|---|---|",
  ]
  for key in sorted({k[:5] for k in ms if k[0] == "gpt-oss"}):
    ours, xla = ms.get((*key, "jax_fa3_sinks")), ms.get((*key, "xla_sinks"))
    if ours:
      lines.append(
        f"| {key[1]} | {key[3]} | {key[4]} | {ours:.3f} | "
        + (f"{xla:.3f} | {xla / ours:.1f}x |" if xla else "- | - |")
      )
  return "\n".join(lines) + "\n"


def plot(records, header, out_dir):
  plt = pyplot()
  if plt is None:
    return []
  rows = [r for r in records if r["part"] == "overhead"]
  fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4), squeeze=False)
  for ax, mode in zip(axes[0], MODES):
    ms = {
      (r["head_dim"], r["mask"], r["seqlen_q"], r["impl"]): r["ms"]
      for r in rows
      if r["mode"] == mode
    }
    cells = sorted(
      {k[:3] for k in ms if (*k[:3], "jax_fa3") in ms and (*k[:3], "jax_fa3_sinks") in ms}
    )
    ax.bar(range(len(cells)), [ms[(*c, "jax_fa3_sinks")] / ms[(*c, "jax_fa3")] for c in cells])
    ax.axhline(1.02 if mode == "fwd" else 1.03, color="red", linestyle="--", label="target")
    ax.set_xticks(
      range(len(cells)), [f"d{d}\n{mask}\n{n // 1024}k" for d, mask, n in cells], fontsize=6
    )
    ax.set_ylim(0.9, 1.1)
    ax.set_ylabel("time with sinks / without")
    ax.set_title(mode)
    ax.legend(fontsize=8)
  fig.suptitle(f"attention sinks: {header}", fontsize=9)
  fig.tight_layout()
  path = out_dir / "sinks.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=None)
  parser.add_argument("--seqlens", type=int, nargs="+", default=None)
  parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
  parser.add_argument("--iterations", type=int, default=None)
  parser.add_argument("--out", type=__import__("pathlib").Path)
  args = parser.parse_args(argv)
  gpu = on_gpu()
  head_dims = args.head_dims or ((64, 128) if gpu else (64,))
  seqlens = args.seqlens or ((2048, 8192, 16384) if gpu else (256,))
  iterations = args.iterations or (20 if gpu else 2)
  card = card_name()
  out_dir = args.out or default_out_dir(card)
  out_dir.mkdir(parents=True, exist_ok=True)
  save = lambda records: (out_dir / "sinks.json").write_text(json.dumps(records, indent=1))
  records = run(problems(head_dims, seqlens, gpu), args.modes, iterations, card, save)
  save(records)
  header = results_header(card, "bfloat16", iterations)
  table = markdown(records, header)
  (out_dir / "sinks.md").write_text(table)
  print("\n" + table)
  print(
    "wrote",
    [
      str(p)
      for p in [out_dir / "sinks.json", out_dir / "sinks.md", *plot(records, header, out_dir)]
    ],
  )


if __name__ == "__main__":
  main()
