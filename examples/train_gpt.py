"""Train a small GPT (a decoder-only transformer in Flax NNX) with jax.jit and optax, on
jax_fa3's attention or on jax.nn.dot_product_attention's XLA or cuDNN implementation.

The data is generated: additions such as "317+45=362;", one character a token. With the
same seed every attention choice starts from the same weights and sees the same batches,
so their loss curves differ by rounding alone. To show how much rounding that is, the
script also trains once with the attention computed in float32 ("float32 attention"),
and prints each choice's largest loss difference from that run: jax_fa3's should be no
larger than twice the bfloat16 XLA run's. It prints the step time of each choice too
(compare those on a GPU; on a CPU jax_fa3 runs its float32 reference).

    python examples/train_gpt.py                                # every choice this machine has
    python examples/train_gpt.py --attention jax_fa3 cudnn --steps 200
    python examples/train_gpt.py --packed    # documents packed in rows: segment ids vs dense masks
"""

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_fa3.flax

VOCAB = "0123456789+=;"


@dataclasses.dataclass(frozen=True)
class Config:
  seqlen: int
  batch: int
  layers: int
  d_model: int
  heads: int
  steps: int
  learning_rate: float
  warmup_steps: int
  seed: int = 0
  packed: bool = False  # rows of several documents, attention within each


TINY = Config(
  seqlen=64, batch=8, layers=2, d_model=64, heads=4, steps=30, learning_rate=3e-3, warmup_steps=5
)
GPU = Config(
  seqlen=2048,
  batch=16,
  layers=4,
  d_model=1024,
  heads=8,
  steps=60,
  learning_rate=1e-3,
  warmup_steps=10,
)


def on_gpu():
  return jax.devices()[0].platform == "gpu"


# --- Attention choices: nnx attention_fns -----------------------------------------------


def jax_nn_attention(implementation, compute_dtype=None):
  """An nnx `attention_fn` running `jax.nn.dot_product_attention(implementation=...)`,
  in `compute_dtype` if given (the result is rounded back to the inputs' dtype)."""

  def attention(query, key, value, *, mask=None, is_causal=False, **flax_args):
    del flax_args  # dropout and sown weights: this model uses neither
    upcast = (x.astype(compute_dtype or x.dtype) for x in (query, key, value))
    out = jax.nn.dot_product_attention(
      *upcast, mask=mask, is_causal=is_causal, implementation=implementation
    )
    return out.astype(query.dtype)

  return attention


# The choice that takes packed documents as segment ids; the others get the dense mask.
TAKES_SEGMENT_IDS = ("jax_fa3",)
ATTENTION = {
  # strict: a call the kernels can't serve is an error here, not a silent slowdown.
  "jax_fa3": functools.partial(jax_fa3.flax.nnx.dot_product_attention, strict=True),
  "xla": jax_nn_attention("xla"),
  "cudnn": jax_nn_attention("cudnn"),
}
FLOAT32_ATTENTION = jax_nn_attention("xla", jnp.float32)


def available_choices():
  return [name for name in ATTENTION if name != "cudnn" or on_gpu()]


# --- Data ---------------------------------------------------------------------------------


def batches(config):
  """Token windows [steps, batch, seqlen + 1] cut at random from generated additions."""
  rng = np.random.default_rng(config.seed)
  problems = config.steps * config.batch * (config.seqlen + 1) // 10 + 1  # ~10 characters each
  a, b = rng.integers(0, 1000, size=(2, problems))
  text = "".join(f"{x}+{y}={x + y};" for x, y in zip(a, b))
  token_of = np.zeros(256, np.int32)
  token_of[np.frombuffer(VOCAB.encode(), np.uint8)] = np.arange(len(VOCAB))
  tokens = token_of[np.frombuffer(text.encode(), np.uint8)]
  starts = rng.integers(0, len(tokens) - config.seqlen - 1, size=(config.steps, config.batch))
  return tokens[starts[..., None] + np.arange(config.seqlen + 1)]


def packed_batches(config):
  """Rows of documents of random length (1/16 to 1/2 of a row), each cut from the text:
  tokens and their document ids, both [steps, batch, seqlen + 1]."""
  windows = batches(config)
  rng = np.random.default_rng(config.seed + 1)
  ids = np.zeros_like(windows)
  for step, row in np.ndindex(windows.shape[:2]):
    start, doc = 0, 0
    while start < windows.shape[2]:
      length = int(rng.integers(config.seqlen // 16, config.seqlen // 2 + 1))
      ids[step, row, start : start + length] = doc
      start, doc = start + length, doc + 1
  return windows, ids


def positions_in_documents(segment_ids):
  """Each token's position within its own document."""
  index = jnp.arange(segment_ids.shape[-1])
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
    axis=-1,
  )
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


# --- Model -----------------------------------------------------------------------------


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, config, attention_fn, rngs, takes_segment_ids=False):
    d, dtype = config.d_model, jnp.bfloat16
    self.takes_segment_ids = takes_segment_ids
    self.attention_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    # Flax's module with a call that also takes segment_ids (any attention_fn works in it).
    self.attention = jax_fa3.flax.nnx.MultiHeadAttention(
      config.heads, d, dtype=dtype, decode=False, attention_fn=attention_fn, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(d, 4 * d, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x, segment_ids=None):
    h = self.attention_norm(x)
    if segment_ids is None:
      x = x + self.attention(h, is_causal=True)
    elif self.takes_segment_ids:
      x = x + self.attention(h, is_causal=True, segment_ids=segment_ids)
    else:  # the dense document mask
      documents = segment_ids[..., None, :, None] == segment_ids[..., None, None, :]
      x = x + self.attention(h, is_causal=True, mask=documents)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
  """Token and learned position embeddings, `layers` blocks, a final norm and a head.
  Parameters are float32, computation bfloat16."""

  def __init__(self, config, attention_fn, rngs, takes_segment_ids=False):
    d, dtype = config.d_model, jnp.bfloat16
    self.token_embedding = nnx.Embed(len(VOCAB), d, dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(config.seqlen, d, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List(
      [Block(config, attention_fn, rngs, takes_segment_ids) for _ in range(config.layers)]
    )
    self.final_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(d, len(VOCAB), dtype=dtype, rngs=rngs)

  def __call__(self, tokens, segment_ids=None):
    """Packed rows pass `segment_ids`: positions then restart in each document."""
    positions = (
      jnp.arange(tokens.shape[-1]) if segment_ids is None else positions_in_documents(segment_ids)
    )
    x = self.token_embedding(tokens) + self.position_embedding(positions)
    for block in self.blocks:
      x = block(x, segment_ids)
    return self.head(self.final_norm(x))


# --- Training --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  attention: str
  losses: np.ndarray  # one per step
  step_ms: float  # median wall-clock time of a step, compilation excluded
  compile_s: float  # the first step, which compiles


def train(config, attention, attention_fn=None):
  """Trains a fresh GPT with `config` and the attention named `attention`."""
  model = GPT(
    config,
    attention_fn or ATTENTION[attention],
    nnx.Rngs(config.seed),
    takes_segment_ids=attention in TAKES_SEGMENT_IDS,
  )
  if config.packed:
    data = zip(*map(jnp.asarray, packed_batches(config)))
  else:
    data = ((tokens, None) for tokens in jnp.asarray(batches(config)))
  losses, seconds = fit(model, config, data)
  return Run(attention, losses, 1e3 * statistics.median(seconds[1:]), seconds[0])


def fit(model, config, data):
  """Trains `model` in place: AdamW on a warmup-cosine schedule (config's learning rate,
  warmup and steps), one step for each `(tokens, segment_ids)` of `data`: tokens
  [batch, seqlen + 1], each position predicting the next; segment_ids of that shape (packed
  documents) or None. Returns each step's loss and wall-clock seconds."""
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.learning_rate, config.warmup_steps, config.steps
  )
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
  opt_state = optimizer.init(params)

  def loss_fn(params, tokens, segment_ids):
    if segment_ids is None:
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
      ).mean()
    # Packed: predict the next token within a document only.
    logits = nnx.merge(graphdef, params)(tokens[:, :-1], segment_ids[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]
    )
    inside = segment_ids[:, 1:] == segment_ids[:, :-1]
    return jnp.sum(jnp.where(inside, losses, 0)) / jnp.sum(inside)

  @jax.jit
  def train_step(params, opt_state, tokens, segment_ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, segment_ids)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, seconds = [], []
  for tokens, segment_ids in data:
    start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, tokens, segment_ids)
    losses.append(float(loss))  # waits for the step
    seconds.append(time.perf_counter() - start)
  nnx.update(model, params)
  return np.array(losses), seconds


def compare(config, choices):
  """Trains with each choice, and with float32 attention for the yardstick."""
  runs = {name: train(config, name) for name in choices}
  runs["float32 attention"] = train(config, "float32 attention", FLOAT32_ATTENTION)
  return runs


def distance_from_float32(runs):
  """Each choice's largest loss difference from the float32-attention run."""
  truth = runs["float32 attention"].losses
  return {
    name: float(np.abs(run.losses - truth).max())
    for name, run in runs.items()
    if name != "float32 attention"
  }


def matches_within_bf16_noise(runs):
  """FlashAttention's accuracy rule on loss curves: jax_fa3's is at most twice as far from
  the float32-attention curve as the bfloat16 XLA curve is, plus one bfloat16 rounding of
  the loss (as the rule's `+ 1e-5` for outputs): XLA on a CPU computes bfloat16 products
  in float32, so over a few steps its curve can sit closer to float32 than one rounding."""
  distance = distance_from_float32(runs)
  one_rounding = 2.0**-8 * float(np.abs(runs["float32 attention"].losses).max())
  return distance["jax_fa3"] <= 2 * distance["xla"] + one_rounding


def summary(config, runs):
  distance = distance_from_float32(runs)
  lines = [
    f"{config}; {jax.devices()[0].device_kind}, jax {jax.__version__}",
    "",
    f"{'attention':18} {'first loss':>10} {'last loss':>10} "
    f"{'max |loss - float32 attention loss|':>36} {'step (ms)':>10} {'compile (s)':>11}",
  ]
  for name, run in runs.items():
    lines.append(
      f"{name:18} {run.losses[0]:10.4f} {run.losses[-1]:10.4f} "
      f"{distance.get(name, 0.0):36.5f} {run.step_ms:10.2f} {run.compile_s:11.1f}"
    )
  if "jax_fa3" in runs and "xla" in runs:
    difference = np.abs(runs["jax_fa3"].losses - runs["xla"].losses).max()
    verdict = "within" if matches_within_bf16_noise(runs) else "NOT within"
    lines += [
      "",
      f"max |loss(jax_fa3) - loss(xla)| over {config.steps} steps: {difference:.5f}; "
      f"jax_fa3's loss curve is {verdict} bfloat16 noise of the float32-attention one",
    ]
  if not on_gpu():
    lines.append(
      "No GPU: jax_fa3 ran its float32 reference; step times say nothing of the kernels."
    )
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--attention",
    nargs="+",
    choices=list(ATTENTION),
    help="default: jax_fa3 and xla, and cudnn on a GPU",
  )
  parser.add_argument("--steps", type=int)
  parser.add_argument("--seqlen", type=int)
  parser.add_argument("--batch", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--tiny", action="store_true", help="the CPU size, also on a GPU")
  parser.add_argument(
    "--packed",
    action="store_true",
    help="rows of packed documents: segment ids for jax_fa3, the dense document "
    "mask for the others",
  )
  return parser.parse_args(argv)


def config_from(args):
  config = TINY if args.tiny or not on_gpu() else GPU
  overrides = {
    name: getattr(args, name)
    for name in ("steps", "seqlen", "batch", "seed")
    if getattr(args, name) is not None
  }
  overrides["packed"] = args.packed
  return dataclasses.replace(config, **overrides)


def main(argv=None):
  args = parse_args(argv)
  config = config_from(args)
  runs = compare(config, args.attention or available_choices())
  print(summary(config, runs))


if __name__ == "__main__":
  main()
