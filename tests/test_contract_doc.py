"""cuda/ffi/CONTRACT.md names only what exists: its files, its C++ constants and the Python
and extension functions it cites. A renamed or deleted one fails here, not in a reader."""

import pathlib
import re

import pytest

from jax_fa3 import primitives

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "cuda" / "ffi" / "CONTRACT.md"


def _cited(text, pattern):
  """The `code` spans of `text` that match `pattern` whole."""
  return sorted({m for m in re.findall(r"`([^`]+)`", text) if re.fullmatch(pattern, m)})


def _stale_names(text):
  """What the contract cites and the tree does not have."""
  cuda_sources = "\n".join(
    p.read_text() for p in (ROOT / "cuda").rglob("*") if p.suffix in (".h", ".cc", ".cu")
  )
  module = (ROOT / "cuda" / "ffi" / "module.cc").read_text()
  stale = []
  for path in _cited(text, r"[\w./]+(/|\.(h|cc|cu|py|md))"):
    if not any((base / path).exists() for base in (ROOT, ROOT / "cuda", ROOT / "cuda" / "ffi")):
      stale.append(path)
  stale += [
    name
    for name in _cited(text, r"k[A-Z]\w+")
    if not re.search(rf"\b{name}\b\s*=", cuda_sources) and name != "kCmdBufferCompatible"
  ]
  for call in _cited(text, r"primitives\.\w+(\(\))?"):
    if not hasattr(primitives, call.split(".")[1].rstrip("()")):
      stale.append(call)
  for call in _cited(text, r"(_fa3_cuda\.)?\w+\(\)"):
    name = call.split(".")[-1][:-2]
    if f'"{name}"' not in module:
      stale.append(call)
  return stale


@pytest.mark.skipif(not CONTRACT.exists(), reason="runs beside a checkout")
def test_contract_cites_only_what_exists():
  assert _stale_names(CONTRACT.read_text()) == []


def test_a_stale_citation_is_caught():
  stale = (
    "`cuda/fwd/scheduler.h`, `kFwdTileCounterBytes`, `primitives.fwd_workspace_size()`, "
    "`_fa3_cuda.head_dims()`"
  )
  assert _stale_names(stale) == [
    "cuda/fwd/scheduler.h",
    "kFwdTileCounterBytes",
    "primitives.fwd_workspace_size()",
    "_fa3_cuda.head_dims()",
  ]


def test_forward_workspace_sizes_agree():
  """The forward's workspace: Python allocates at least the handler's minimum, and the
  contract states both numbers."""
  handler = (ROOT / "cuda" / "ffi" / "attention_ffi.cc").read_text()
  minimum = int(re.search(r"kFwdWorkspaceBytes = (\d+);", handler).group(1))
  allocated = primitives.fwd_workspace_bytes()
  assert allocated >= minimum
  text = CONTRACT.read_text()
  assert re.search(rf"at least\s+{minimum}\s+bytes\s+\(`kFwdWorkspaceBytes`", text), (
    "the handler's minimum"
  )
  assert re.search(rf"Python allocates\s+{allocated}\b", text), "Python's size"
