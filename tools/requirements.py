"""Prints requirements from pyproject.toml, one per line, for `pip install`.

    python tools/requirements.py build package test   # build requires, dependencies, an extra

Arguments: "build" ([build-system] requires, less jaxlib), "package" ([project]
dependencies) and names of extras.

The Makefile installs them first, then builds the package without build isolation and
without dependencies, so the build always sees the same headers (and stays incremental)
and its progress is not lost in pip's.

The jaxlib pinned in [build-system] requires (the oldest supported) is there for its XLA FFI
headers alone. Installed beside the package, the pin would hold back the jax that runs it;
so "build" leaves it out, and a build without isolation whose environment has another jaxlib
fetches the pinned one's headers into the build folder itself (CMakeLists.txt).
"""

import pathlib
import sys
import tomllib

pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
groups = {
  "build": [
    requirement
    for requirement in pyproject["build-system"]["requires"]
    if not requirement.startswith("jaxlib")
  ],
  "package": pyproject["project"]["dependencies"],
  **pyproject["project"]["optional-dependencies"],
}
print("\n".join(requirement for group in sys.argv[1:] for requirement in groups[group]))
