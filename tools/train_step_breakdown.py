"""Where one training step of `examples/train_gpt.py` spends its GPU time, per attention
choice: CUPTI kernel times of the jitted step, grouped by kernel name, biggest first.

    python tools/train_step_breakdown.py [--attention jax_fa3 cudnn] [--top 15] [--json OUT]
"""

import argparse
import collections
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.mosaic.gpu import profiler

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import train_gpt  # noqa: E402


def step_function(config, attention):
  """The example's jitted train step and its first inputs."""
  model = train_gpt.GPT(config, train_gpt.ATTENTION[attention], nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adamw(config.learning_rate)
  opt_state = optimizer.init(params)

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jnp.asarray(train_gpt.batches(config)[0])
  return train_step, (params, opt_state, tokens)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--attention", nargs="+", default=["jax_fa3", "cudnn"])
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--json", type=pathlib.Path)
  args = parser.parse_args()
  config = train_gpt.GPU if train_gpt.on_gpu() else train_gpt.TINY
  report = {}
  for attention in args.attention:
    step, inputs = step_function(config, attention)
    _, runs = profiler.measure(step, aggregate=False, iterations=args.iterations)(*inputs)
    by_name = collections.defaultdict(list)
    for run in runs:
      totals = collections.Counter()
      for name, ms in run:
        totals[name] += ms
      for name, ms in totals.items():
        by_name[name].append(ms)
    medians = {name: statistics.median(times) for name, times in by_name.items()}
    total = sum(medians.values())
    print(f"\n{attention}: {total:.3f} ms of kernels per step, {len(runs[0])} launches ({config})")
    for name, ms in sorted(medians.items(), key=lambda item: -item[1])[: args.top]:
      print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:90]}")
    report[attention] = dict(total_ms=total, launches=len(runs[0]), kernels=medians)
  if args.json:
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
