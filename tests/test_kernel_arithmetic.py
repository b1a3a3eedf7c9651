"""Host-compiled checks of the kernels' integer arithmetic, where no GPU is needed:
- the tile ranges (cuda/common/block_ranges.h, cuda/bwd/query_blocks.h) against brute force
  (tests/cpp/block_ranges_check.cc). The backward's deterministic mode relies on the
  forward and backward agreeing on every (query tile, key tile) pair; an off-by-one there
  deadlocks the GPU;
- the backward workspace: Python's bwd_workspace_bytes must cover what the kernels carve
  (tests/cpp/workspace_check.cc), or the FFI handler refuses the call."""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from jax_fa3 import primitives

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build(tmp_path, name):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    binary = tmp_path / name
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{ROOT / 'cuda'}",
                    str(ROOT / "tests" / "cpp" / f"{name}.cc"), "-o", str(binary)], check=True)
    return binary


def test_block_ranges_match_brute_force(tmp_path):
    result = subprocess.run([str(_build(tmp_path, "block_ranges_check"))], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_python_workspace_covers_the_kernels(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(500):
        hk = int(rng.choice([1, 2, 4]))
        cases.append((int(rng.integers(1, 5)), int(rng.integers(1, 3000)), int(rng.integers(1, 3000)),
                      hk * int(rng.choice([1, 2, 8])), hk, int(rng.choice([64, 128, 256])), int(rng.integers(0, 2))))
    stdin = "".join(" ".join(map(str, c)) + "\n" for c in cases)
    result = subprocess.run([str(_build(tmp_path, "workspace_check"))], input=stdin, capture_output=True,
                            text=True, check=True)
    for (b, sq, sk, h, hk, d, _), needed in zip(cases, map(int, result.stdout.split())):
        assert primitives.bwd_workspace_bytes(b, sq, sk, h, hk, d, d) >= needed, (b, sq, sk, h, hk, d)
