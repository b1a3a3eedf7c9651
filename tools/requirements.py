"""Prints requirements from pyproject.toml, one per line, for `pip install`.

    python tools/requirements.py build package test   # build requires, dependencies, an extra

Arguments: "build" ([build-system] requires), "package" ([project] dependencies) and
names of extras.

The Makefile installs them first, then builds the package without build isolation and
without dependencies, so the build always sees the same headers (and stays incremental)
and its progress is not lost in pip's.
"""

import pathlib
import sys
import tomllib

pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
groups = {
  "build": pyproject["build-system"]["requires"],
  "package": pyproject["project"]["dependencies"],
  **pyproject["project"]["optional-dependencies"],
}
print("\n".join(requirement for group in sys.argv[1:] for requirement in groups[group]))
