"""Greedy generation with the example GPT (train_gpt.py's model, Flax NNX, `jax.jit`) on
jax_fa3's KV-cache decode, checked token for token against generation without a cache.

The model is first trained briefly (train_gpt.fit, `--train-steps`) on a task whose next
token is certain: each sequence starts with PERIOD random digits, and every later digit is
the one PERIOD positions back plus one (mod 10), so each prediction needs attention to an
earlier token, which generation reads from the cache. With untrained weights the logits are
nearly flat, and bfloat16 roundings alone (any two correct attention implementations round
differently) flip greedy choices between near ties; a trained model predicts with wide
margins, so equal tokens say that the cache is right. The script prints the smallest margin
between the two best logits over all the no-cache loop's predictions, beside what bfloat16
roundings can move, and fails unless the cached tokens equal the no-cache ones and that
margin is wider.

Three loops generate the same tokens from the same prompts and weights:
- "jax_fa3 paged cache": one paged KV cache per layer (`[num_pages, page_size, heads,
  head_dim]`, each sequence's pages given by a shuffled page table), donated to every jitted
  step, so `flash_attention_with_kvcache` writes the new keys and values in place. The prompt
  is prefilled in one call (its keys appended with `k_new`/`v_new`, q covering them), then
  each step appends one token.
- "no cache": each step runs the whole model over the whole sequence (full causal attention,
  `flash_attention`), and takes the next token from the last position's logits.
- the same cached loop on a contiguous cache with `jax.nn.dot_product_attention`, cuDNN's
  implementation on a GPU (XLA's elsewhere), the lengths as `key_value_seq_lengths`.

It prints tokens/s of each loop (compilation excluded), whether their tokens agree with
the no-cache loop's, and how many of those follow the task's rule. Without a GPU it trains
and runs a tiny model on jax_fa3's float32 reference path, and says so: its timings then
say nothing of the kernels.

    python examples/generate.py                  # GPU: batch 16, 512-token prompts, 512 new
    python examples/generate.py --tiny           # the CPU size, also on a GPU
    python examples/generate.py --train-steps 0  # untrained: the check is left to ties
    python examples/generate.py --batch 64 --new-tokens 256 --page-size 64
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_gpt  # noqa: E402  (the model and its configurations)

from jax_fa3 import flash_attention_with_kvcache  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  model: train_gpt.Config  # its seqlen is the longest sequence (the position table)
  batch: int
  prompt_len: int
  new_tokens: int
  page_size: int
  train_steps: int  # on the task, before generating
  seed: int = 0

  def __post_init__(self):
    if self.prompt_len < PERIOD or self.new_tokens < 1 or self.train_steps < 0:
      raise ValueError(
        f"prompt_len must be >= {PERIOD} (the task's period), new_tokens >= 1 "
        f"and train_steps >= 0, got {self}"
      )
    if self.prompt_len + self.new_tokens > self.model.seqlen:
      raise ValueError(
        f"prompt_len + new_tokens = {self.prompt_len + self.new_tokens} is "
        f"past the model's {self.model.seqlen} positions"
      )

  @property
  def pages_per_sequence(self):
    return -(-self.model.seqlen // self.page_size)


PERIOD = 5  # the task's: each digit is the one PERIOD positions back plus one

TINY = Config(train_gpt.TINY, batch=4, prompt_len=10, new_tokens=24, page_size=16, train_steps=200)
GPU = Config(train_gpt.GPU, batch=16, prompt_len=512, new_tokens=512, page_size=64, train_steps=500)


def on_gpu():
  return train_gpt.on_gpu()


def baseline_implementation():
  """jax.nn.dot_product_attention's implementation for the comparison loop."""
  return "cudnn" if on_gpu() else "xla"


# --- The task and the training -----------------------------------------------------------


def task_sequences(rng, count, length):
  """`count` sequences [count, length] of the task: PERIOD random digits (tokens 0-9 are
  the digits), then each digit the one PERIOD positions back plus one, mod 10."""
  start = rng.integers(0, 10, (count, PERIOD), dtype=np.int32)
  position = np.arange(length)
  return ((start[:, position % PERIOD] + position // PERIOD) % 10).astype(np.int32)


def prompts_and_rule(config):
  """Prompts [batch, prompt_len] of the task, drawn apart from the training data, and the
  rule's continuation of them [batch, new_tokens]."""
  sequences = task_sequences(
    np.random.default_rng([config.seed, 1]), config.batch, config.prompt_len + config.new_tokens
  )
  return jnp.asarray(sequences[:, : config.prompt_len]), sequences[:, config.prompt_len :]


def new_model(config):
  return train_gpt.GPT(config.model, train_gpt.ATTENTION["jax_fa3"], nnx.Rngs(config.model.seed))


def trained_model(config):
  """A new model trained on the task for `config.train_steps` steps of train_gpt's batch
  size and length (its learning rate; warmup at most a fifth of the steps): (model, each
  step's loss, seconds spent training)."""
  model = new_model(config)
  if not config.train_steps:
    return model, np.zeros(0), 0.0
  training = dataclasses.replace(
    config.model,
    steps=config.train_steps,
    warmup_steps=min(config.model.warmup_steps, config.train_steps // 5),
  )
  rng = np.random.default_rng([config.seed, 0])
  data = (
    (jnp.asarray(task_sequences(rng, training.batch, training.seqlen + 1)), None)
    for _ in range(config.train_steps)
  )
  start = time.perf_counter()
  losses, _ = train_gpt.fit(model, training, data)
  return model, losses, time.perf_counter() - start


# --- The model, one block at a time, with a cache -------------------------------------------


def cached_forward(model, tokens, lengths, caches, attend):
  """Runs `tokens [batch, n]` at positions `lengths + [0, n)` through the model, each layer's
  attention given by `attend(layer, q, k, v, cache) -> (out, cache)`. Returns the last
  position's logits and the updated caches."""
  positions = lengths[:, None] + jnp.arange(tokens.shape[1])
  x = model.token_embedding(tokens) + model.position_embedding(positions)
  new_caches = []
  for layer, (block, cache) in enumerate(zip(model.blocks, caches)):
    mha = block.attention
    h = block.attention_norm(x)
    out, cache = attend(layer, mha.query(h), mha.key(h), mha.value(h), cache)
    new_caches.append(cache)
    x = x + mha.out(out)
    x = x + block.mlp_out(jax.nn.gelu(block.mlp_in(block.mlp_norm(x))))
  return logits(model, x[:, -1]), new_caches


def logits(model, x):
  """The head in float32 (the model's runs in bfloat16): bfloat16 logits tie often, and a
  tie that rounding breaks either way would make the greedy loops differ for no reason."""
  head = model.head
  return (
    jnp.dot(
      model.final_norm(x).astype(jnp.float32), head.kernel[...], precision=jax.lax.Precision.HIGHEST
    )
    + head.bias[...]
  )


def uncached_forward(model, tokens):
  """The model's own forward pass (full causal attention), with `logits`' head."""
  x = model.token_embedding(tokens) + model.position_embedding(jnp.arange(tokens.shape[-1]))
  for block in model.blocks:
    x = block(x)
  return logits(model, x)


def paged_attend(page_table):
  def attend(layer, q, k, v, cache):
    del layer
    k_cache, v_cache, lengths = cache
    out, k_cache, v_cache = flash_attention_with_kvcache(
      q, k_cache, v_cache, lengths, k_new=k, v_new=v, page_table=page_table, causal=True
    )
    return out, (k_cache, v_cache, lengths)

  return attend


def jax_nn_attend(implementation):
  """A contiguous cache [batch, seqlen, heads, head_dim]; all sequences have one length here
  (same prompt length), so the write is one dynamic_update_slice."""

  def attend(layer, q, k, v, cache):
    del layer
    k_cache, v_cache, lengths = cache
    start = lengths[0]
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
    # Prefill starts at 0, so top-left causal is right; a decode row sees every valid key.
    out = jax.nn.dot_product_attention(
      q,
      k_cache,
      v_cache,
      is_causal=q.shape[1] > 1,
      key_value_seq_lengths=lengths + q.shape[1],
      implementation=implementation,
    )
    return out, (k_cache, v_cache, lengths)

  return attend


def cached_generate(config, model, attend, new_caches):
  """Greedy generation with a cache: returns a function `prompt -> tokens [batch, new_tokens]`
  whose jitted steps donate the caches."""
  graphdef, state = nnx.split(model)

  def prefill_and_first(state, prompt, caches):
    return _step(state, prompt, jnp.zeros(prompt.shape[0], jnp.int32), caches)

  def step(state, token, lengths, caches):
    return _step(state, token[:, None], lengths, caches)

  def _step(state, tokens, lengths, caches):
    caches = [(k, v, lengths) for k, v in caches]
    scores, caches = cached_forward(nnx.merge(graphdef, state), tokens, lengths, caches, attend)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), [(k, v) for k, v, _ in caches]

  prefill_and_first = jax.jit(prefill_and_first, donate_argnums=2)
  step = jax.jit(step, donate_argnums=3)

  def generate(prompt):
    caches = new_caches()
    token, caches = prefill_and_first(state, prompt, caches)
    tokens = [token]
    lengths = jnp.full(prompt.shape[0], prompt.shape[1], jnp.int32)
    for _ in range(config.new_tokens - 1):
      token, caches = step(state, token, lengths, caches)
      tokens.append(token)
      lengths = lengths + 1
    return jnp.stack(tokens, axis=1)

  return generate


def paged_caches(config, model):
  """Per layer, a paged K and V cache and the page table they share: each sequence owns
  `pages_per_sequence` pages, scattered through the pool at random."""
  heads = config.model.heads
  head_dim = config.model.d_model // heads
  pages = config.batch * config.pages_per_sequence
  shape = (pages, config.page_size, heads, head_dim)
  page_table = np.random.default_rng(config.seed).permutation(pages).astype(np.int32)
  page_table = jnp.asarray(page_table.reshape(config.batch, config.pages_per_sequence))

  def new_caches():
    return [(jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)) for _ in model.blocks]

  return page_table, new_caches


def contiguous_caches(config, model):
  heads = config.model.heads
  shape = (config.batch, config.model.seqlen, heads, config.model.d_model // heads)
  return lambda: [
    (jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)) for _ in model.blocks
  ]


def uncached_generate(config, model):
  """Greedy generation that runs the whole model over the whole (fixed-size) sequence each
  step: causal attention keeps the not yet written positions from mattering. Returns the
  tokens and, per new token, the logits it was chosen from [batch, new_tokens, vocab]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, sequence, position):
    logits = uncached_forward(nnx.merge(graphdef, state), sequence)
    logits = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_index_in_dim(sequence, token, position, axis=1), logits

  def generate(prompt):
    sequence = jnp.zeros((config.batch, config.model.seqlen), jnp.int32)
    sequence = sequence.at[:, : config.prompt_len].set(prompt)
    all_logits = []
    for position in range(config.prompt_len, config.prompt_len + config.new_tokens):
      sequence, logits = step(state, sequence, jnp.int32(position))
      all_logits.append(logits)
    return sequence[:, config.prompt_len : config.prompt_len + config.new_tokens], jnp.stack(
      all_logits, 1
    )

  return generate


# --- Running and comparing --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  tokens: np.ndarray  # [batch, new_tokens]
  tokens_per_s: float  # new tokens of the whole batch per second, compilation excluded


def timed(name, generate, prompt, batch, new_tokens):
  generate(prompt).block_until_ready()  # compiles
  start = time.perf_counter()
  tokens = np.asarray(generate(prompt))
  seconds = time.perf_counter() - start
  return Run(name, tokens, batch * new_tokens / seconds)


@dataclasses.dataclass(frozen=True)
class Results:
  runs: dict  # loop name -> Run
  logits: np.ndarray  # the no-cache loop's, each new token's [batch, new_tokens, vocab]
  rule: np.ndarray  # the task's continuation of the prompts [batch, new_tokens]
  losses: np.ndarray  # the training's, one a step
  train_seconds: float


def run_all(config):
  """Trains the model, then runs the three loops on it and the same prompts."""
  model, losses, train_seconds = trained_model(config)
  prompt, rule = prompts_and_rule(config)
  page_table, new_paged = paged_caches(config, model)
  runs, logits = {}, None

  def uncached(prompt):
    nonlocal logits
    tokens, logits = uncached_generate(config, model)(prompt)
    return tokens

  loops = {
    "jax_fa3 paged cache": cached_generate(config, model, paged_attend(page_table), new_paged),
    "no cache": uncached,
    f"{baseline_implementation()} cache": cached_generate(
      config, model, jax_nn_attend(baseline_implementation()), contiguous_caches(config, model)
    ),
  }
  for name, generate in loops.items():
    runs[name] = timed(name, generate, prompt, config.batch, config.new_tokens)
  return Results(runs, np.asarray(logits, np.float32), rule, losses, train_seconds)


def top_two_margins(logits):
  """Each prediction's best logit minus its second best: [...] of logits [..., vocab]."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return top2[..., 1] - top2[..., 0]


def rounding_bound(logits):
  """What bfloat16 roundings of the activations may move a top-1/top-2 margin by: two
  roundings (2^-8 each, relative) of the largest best logit. A greedy choice between logits
  closer than this is a near tie, which two correct implementations may break apart."""
  return 2 * 2.0**-8 * float(np.abs(np.max(logits, axis=-1)).max())


def agreement(tokens, truth, truth_logits):
  """How `tokens` compare with the no-cache loop's `truth`: "equal", or where each sequence
  first differs, with the no-cache loop's top-1/top-2 logit margin there."""
  if np.array_equal(tokens, truth):
    return "equal"
  margins = top_two_margins(truth_logits)
  notes = []
  for b in np.flatnonzero((tokens != truth).any(axis=1)):
    t = int(np.argmax(tokens[b] != truth[b]))
    notes.append(f"seq {b} from token {t} (logit margin {margins[b, t]:.4f})")
  return "differ: " + "; ".join(notes)


def decisive(results):
  """Whether every no-cache prediction's margin is wider than bfloat16 roundings can move."""
  return top_two_margins(results.logits).min() > rounding_bound(results.logits)


def passed(results):
  """The example's check: the jax_fa3 loop's tokens equal the no-cache loop's, and no
  greedy choice of those was a near tie."""
  runs = results.runs
  return agreement(
    runs["jax_fa3 paged cache"].tokens, runs["no cache"].tokens, results.logits
  ) == "equal" and decisive(results)


def summary(config, results):
  runs, logits = results.runs, results.logits
  truth = runs["no cache"].tokens
  losses = results.losses
  lines = [f"{config}; {jax.devices()[0].device_kind}, jax {jax.__version__}", ""]
  if len(losses):
    lines.append(
      f"trained {len(losses)} steps in {results.train_seconds:.1f} s: loss "
      f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    )
  else:
    lines.append("untrained (--train-steps 0): random weights")
  lines += ["", f"{'loop':22} {'tokens/s':>10}  tokens vs no cache"]
  for name, run in runs.items():
    verdict = "-" if name == "no cache" else agreement(run.tokens, truth, logits)
    lines.append(f"{name:22} {run.tokens_per_s:10.1f}  {verdict}")
  margin, bound = top_two_margins(logits).min(), rounding_bound(logits)
  follow = np.mean(truth == results.rule)
  lines += [
    "",
    f"no-cache tokens that follow the task's rule: {follow:.1%}",
    f"smallest top-1/top-2 logit margin of the {truth.size} no-cache predictions: "
    f"{margin:.4f}; bfloat16 roundings may move one by {bound:.4f}: "
    + (
      "the equality is not decided by ties"
      if margin > bound
      else "NOT decisive: a near tie (train longer: --train-steps)"
    ),
  ]
  prompt, _ = prompts_and_rule(config)
  first = "".join(train_gpt.VOCAB[t] for t in np.asarray(prompt)[0])
  lines += [
    "",
    f"sequence 0: {first!r} -> "
    f"{''.join(train_gpt.VOCAB[t] for t in runs['jax_fa3 paged cache'].tokens[0])!r}",
  ]
  if not on_gpu():
    lines.append(
      "No GPU: tiny model; jax_fa3 ran its float32 reference path and the "
      "comparison loop XLA's attention, so tokens/s say nothing of the kernels."
    )
  return "\n".join(lines)


FIELDS = ("batch", "prompt_len", "new_tokens", "page_size", "train_steps", "seed")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="the CPU size, also on a GPU")
  for name in FIELDS:
    parser.add_argument("--" + name.replace("_", "-"), type=int)
  return parser.parse_args(argv)


def config_from(args):
  config = TINY if args.tiny or not on_gpu() else GPU
  overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
  return dataclasses.replace(config, **overrides)


def main(argv=None):
  config = config_from(parse_args(argv))
  results = run_all(config)
  print(summary(config, results))
  return 0 if passed(results) else 1


if __name__ == "__main__":
  sys.exit(main())
