"""The examples, at a tiny size: the GPT's loss curves match, the drop-in equals Flax."""

import dataclasses
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("on_cpu")
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_gpt_loss_curves_match_within_bf16_noise():
  train_gpt = _load("train_gpt")
  config = dataclasses.replace(train_gpt.TINY, steps=10, warmup_steps=2)
  runs = train_gpt.compare(config, ["jax_fa3", "xla"])
  assert train_gpt.matches_within_bf16_noise(runs), train_gpt.summary(config, runs)
  for run in runs.values():
    assert run.losses[-1] < run.losses[0] - 0.2, f"{run.attention} did not learn: {run.losses}"


def test_train_gpt_batches_are_additions():
  train_gpt = _load("train_gpt")
  windows = train_gpt.batches(train_gpt.TINY)
  assert windows.shape == (30, 8, 65)
  text = "".join(train_gpt.VOCAB[t] for t in windows[0, 0])
  for problem in text.split(";")[1:-1]:
    a, b, total = map(int, problem.replace("=", "+").split("+"))
    assert a + b == total, text


def test_flax_drop_in_equals_flax():
  flax_out, jax_fa3_out = _load("flax_drop_in").flax_and_jax_fa3_outputs()
  flax_out, jax_fa3_out = (np.asarray(x, np.float32) for x in (flax_out, jax_fa3_out))
  one_rounding = float(jnp.finfo(jnp.bfloat16).eps) * np.abs(flax_out).max()
  assert np.abs(jax_fa3_out - flax_out).max() <= one_rounding


def test_train_gpt_packed_loss_curves_match_within_bf16_noise():
  """Packed documents: jax_fa3 takes segment ids, XLA the dense document mask."""
  train_gpt = _load("train_gpt")
  config = dataclasses.replace(train_gpt.TINY, steps=10, warmup_steps=2, packed=True)
  runs = train_gpt.compare(config, ["jax_fa3", "xla"])
  assert train_gpt.matches_within_bf16_noise(runs), train_gpt.summary(config, runs)
  tokens, ids = train_gpt.packed_batches(config)
  assert ids.shape == tokens.shape and (np.diff(ids, axis=-1) >= 0).all() and ids[..., -1].min() > 0
  positions = np.asarray(train_gpt.positions_in_documents(jnp.asarray(ids[0, 0])))
  assert (
    positions[0] == 0
    and (positions[1:] == np.where(np.diff(ids[0, 0]) > 0, 0, positions[:-1] + 1)).all()
  )


def test_generate_paged_cache_tokens_equal_no_cache_tokens():
  """The example's claim: after its brief training, greedy generation on the paged KV cache
  (prefill, then one token a step, caches donated) picks the same tokens as recomputing the
  whole sequence each step, and no choice was a near tie: the model continues the task's
  rule with wide logit margins."""
  generate = _load("generate")
  config = dataclasses.replace(generate.TINY, new_tokens=20)
  results = generate.run_all(config)
  runs, logits = results.runs, results.logits
  truth = runs["no cache"].tokens
  report = generate.summary(config, results)
  assert truth.shape == (config.batch, config.new_tokens)
  assert logits.shape == (config.batch, config.new_tokens, len(generate.train_gpt.VOCAB))
  assert len(results.losses) == config.train_steps and results.losses[-1] < 0.5, report
  # The model learned the task: every token is the rule's, so it attended to the cache.
  np.testing.assert_array_equal(truth, results.rule, err_msg=report)
  assert len(np.unique(truth)) > 2, truth  # not a degenerate constant stream
  for name, run in runs.items():
    assert generate.agreement(run.tokens, truth, logits) == "equal", report
  margin = generate.top_two_margins(logits).min()
  assert margin > 4 * generate.rounding_bound(logits) and generate.decisive(results), report
  assert generate.passed(results)
  assert f"logit margin of the {truth.size} no-cache predictions: {margin:.4f}" in report
  # The check itself can fail: one changed token is reported, at its position and margin.
  changed = truth.copy()
  changed[1, 7] = (changed[1, 7] + 1) % len(generate.train_gpt.VOCAB)
  verdict = generate.agreement(changed, truth, logits)
  assert verdict.startswith("differ: seq 1 from token 7 (logit margin "), verdict
  wrong = dataclasses.replace(
    results,
    runs={
      **runs,
      "jax_fa3 paged cache": dataclasses.replace(runs["jax_fa3 paged cache"], tokens=changed),
    },
  )
  assert not generate.passed(wrong)
  flat = dataclasses.replace(results, logits=np.zeros_like(logits))  # all ties
  assert not generate.decisive(flat) and not generate.passed(flat)


def test_generate_task_sequences_follow_the_rule():
  generate = _load("generate")
  sequences = generate.task_sequences(np.random.default_rng(0), 6, 40)
  period = generate.PERIOD
  assert sequences.shape == (6, 40) and sequences.dtype == np.int32
  assert sequences.min() >= 0 and sequences.max() <= 9
  np.testing.assert_array_equal(sequences[:, period:], (sequences[:, :-period] + 1) % 10)
  prompt, rule = generate.prompts_and_rule(generate.TINY)
  assert prompt.shape == (generate.TINY.batch, generate.TINY.prompt_len)
  assert rule.shape == (generate.TINY.batch, generate.TINY.new_tokens)
  whole = np.concatenate([np.asarray(prompt), rule], axis=1)
  np.testing.assert_array_equal(whole[:, period:], (whole[:, :-period] + 1) % 10)


def test_generate_page_table_scatters_pages():
  generate = _load("generate")
  config = generate.TINY
  page_table, new_caches = generate.paged_caches(config, generate.new_model(config))
  table = np.asarray(page_table)
  assert table.shape == (config.batch, config.pages_per_sequence)
  assert sorted(table.ravel()) == list(range(table.size))
  assert not np.array_equal(table.ravel(), np.arange(table.size))  # not the contiguous order
  assert new_caches()[0][0].shape == (table.size, config.page_size, 4, 16)
