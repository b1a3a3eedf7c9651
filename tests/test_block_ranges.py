"""The kernels' tile-range arithmetic (cuda/common/block_ranges.h, cuda/bwd/query_blocks.h),
compiled for the host and checked against brute force by tests/cpp/block_ranges_check.cc.

The backward's deterministic mode relies on the forward and backward agreeing on every
(query tile, key tile) pair; an off-by-one there deadlocks the GPU, so it is checked here,
where no GPU is needed."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_block_ranges_match_brute_force(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    binary = tmp_path / "block_ranges_check"
    subprocess.run([compiler, "-std=c++17", "-O2", f"-I{ROOT / 'cuda'}",
                    str(ROOT / "tests" / "cpp" / "block_ranges_check.cc"), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
