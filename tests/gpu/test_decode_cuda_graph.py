"""flash_attention_with_kvcache captured in a CUDA graph (an XLA command buffer) and
replayed: the same decode loop (cuda_graph_decode_steps.py) runs in two processes, once
with XLA's command buffers forced on for custom calls and once with them off. The first
must really have put the decode call in a command buffer (read off XLA's dumps of the step:
its optimized HLO, or its thunk sequence), both must agree bit for bit, and every step must
match the float64 oracle."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import oracle

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "cuda_graph_decode_steps.py"
GRAPHS_ON = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
GRAPHS_OFF = "--xla_gpu_enable_command_buffer="


def _run_steps(tmp_path, name, xla_flags):
  dump = tmp_path / f"{name}_hlo"
  result = tmp_path / f"{name}.npz"
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags} --xla_dump_to={dump}".strip()
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), str(HERE), env.get("PYTHONPATH", "")])
  done = subprocess.run(
    [sys.executable, str(SCRIPT), str(result)], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return dict(np.load(result)), dump


def _decode_in_command_buffer(dump):
  """Whether XLA put the decode step's custom call in a command buffer, and what it dumped.

  Read off the dump of the step's module (the one whose optimized HLO calls jax_fa3_decode):
  XLA versions that form command buffers on the HLO outline a computation named
  command_buffer* around the call; newer ones convert thunks instead (jax 0.11.2: the
  module's thunk_sequence_after_thunk_passes.txt, written where a thunk pass changed the
  sequence, holds a kCommandBuffer thunk with the kCustomCall nested in it; the module has
  no other custom call)."""
  optimized = [
    p for p in dump.glob("*after_optimizations.txt") if "jax_fa3_decode" in p.read_text()
  ]
  assert optimized, f"no optimized HLO with the decode call in {dump}"
  module = optimized[0].name.split(".sm_")[0]  # module_NNNN.jit_<name>
  hlo = optimized[0].read_text()
  computations = re.split(r"\n(?=\S)", hlo)  # each starts at column 0
  outlined = any(
    re.match(r"%?command_buffer", c) and 'custom_call_target="jax_fa3_decode"' in c
    for c in computations
  )
  before, after = (
    dump / f"{module}.{n}.txt" for n in ("thunk_sequence", "thunk_sequence_after_thunk_passes")
  )
  thunks = {p.name: p.read_text() for p in (before, after) if p.exists()}
  # "000: kCommandBuffer ...", then its commands indented, the custom call among them.
  nested_call = r"^\d+: kCommandBuffer\b.*(?:\n[ \t]+\d+: .*)*?\n[ \t]+\d+: kCustomCall\b"
  converted = after.exists() and re.search(nested_call, after.read_text(), re.MULTILINE)
  return bool(outlined or converted), thunks


def test_decode_replays_in_a_cuda_graph(tmp_path):
  graphs, dump_on = _run_steps(tmp_path, "graphs", GRAPHS_ON)
  plain, dump_off = _run_steps(tmp_path, "plain", GRAPHS_OFF)
  captured, thunks = _decode_in_command_buffer(dump_on)
  assert captured, f"XLA did not put the decode call in a CUDA graph; its thunks: {thunks}"
  captured, thunks = _decode_in_command_buffer(dump_off)
  assert not captured, f"command buffers were meant to be off; the thunks: {thunks}"
  assert graphs.keys() == plain.keys()
  for name in graphs:
    np.testing.assert_array_equal(graphs[name], plain[name], err_msg=name)

  k_cache, v_cache, table = graphs["k_cache0"], graphs["v_cache0"], graphs["table"]
  steps = sum(1 for name in graphs if name.startswith("out"))
  assert steps >= 4, "too few steps for the graph to be replayed"
  for i in range(steps):
    head_dim = graphs[f"q{i}"].shape[-1]
    out, lse, k_cache, v_cache = oracle.kvcache(
      graphs[f"q{i}"],
      k_cache,
      v_cache,
      graphs[f"lengths{i}"],
      graphs[f"k_new{i}"],
      graphs[f"v_new{i}"],
      table,
      scale=head_dim**-0.5,
    )
    np.testing.assert_allclose(graphs[f"out{i}"], out, atol=2e-2, err_msg=f"step {i}")
    np.testing.assert_allclose(graphs[f"lse{i}"], lse, atol=2e-3, rtol=1e-4, err_msg=f"step {i}")
  np.testing.assert_array_equal(graphs["k_cache"], k_cache)
  np.testing.assert_array_equal(graphs["v_cache"], v_cache)


if __name__ == "__main__":
  pytest.main([__file__, "-v"])
