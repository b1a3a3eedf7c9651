"""The Python sources keep one format: `ruff format`, configured in pyproject.toml."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sources_are_formatted():
  result = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--no-cache", "--check", "--diff", str(ROOT)],
    capture_output=True,
    text=True,
    check=False,
    cwd=ROOT,
  )
  assert result.returncode == 0, (
    "run `ruff format` (pyproject.toml has its settings):\n"
    + result.stdout[-4000:]
    + result.stderr[-2000:]
  )
