"""tools/device/ab_table.py: the A/B logs of device calls read cell by cell."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "device" / "ab_table.py"
_spec = importlib.util.spec_from_file_location("ab_table", _PATH)
ab_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_table)

LOG = """\
base_1 [  1/2] jax_fa3  d=128 batch=1   seqlen_k=8192   page=0        12.0 us     2800 GB/s
base_1 [  2/2] jax_fa3  d=128 batch=8   seqlen_k=8192   page=16       70.0 us     3800 GB/s
new_1 [  1/2] jax_fa3  d=128 batch=1   seqlen_k=8192   page=0        10.0 us     3300 GB/s
new_2 [  1/2] jax_fa3  d=128 batch=1   seqlen_k=8192   page=0        11.0 us     3100 GB/s
fp8_1 [  1/1] jax_fa3                            d=128 causal=False seqlen=2048  batch=8       0.372 ms    739.8 TFLOP/s
pytest noise that is not a result line: 12.0 us
"""


def test_cells_runs_and_units():
  times = ab_table.read(LOG.splitlines())
  assert times[("base", "jax_fa3 d=128 batch=1 seqlen_k=8192 page=0")] == [12.0]
  assert times[("new", "jax_fa3 d=128 batch=1 seqlen_k=8192 page=0")] == [10.0, 11.0]
  assert times[("fp8", "jax_fa3 d=128 causal=False seqlen=2048 batch=8")] == [pytest.approx(372.0)]
  assert len(times) == 4  # base has two cells; the noise line is not read


def test_comparison_is_base_over_new():
  rows = ab_table.compare(ab_table.read(LOG.splitlines()), "base", "new")
  assert len(rows) == 2  # the header, and the one cell both builds ran
  assert "12.00" in rows[1] and "10.50" in rows[1] and "+14.3%" in rows[1]
  assert ab_table.compare(ab_table.read(LOG.splitlines()), "base", "fp8")[1].endswith(
    "(no cell that both ran)"
  )
