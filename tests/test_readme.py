"""The README's training-loop snippet runs as written (here on the reference path)."""

import pathlib
import re

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("on_cpu")
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippet(heading):
  """The first python code block after `heading` in the README."""
  text = README.read_text()
  return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)


@pytest.mark.skipif(not README.exists(), reason="runs beside a checkout")
def test_training_loop_snippet_trains():
  namespace = {}
  code = compile(_snippet("### In a training loop"), str(README), "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  train_step, params, opt_state, x = (
    namespace[name] for name in ("train_step", "params", "opt_state", "x")
  )
  losses = [float(namespace["loss"])]
  for _ in range(20):
    params, opt_state, loss = train_step(params, opt_state, x)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
