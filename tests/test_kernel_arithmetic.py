"""Host-compiled checks of the kernels' integer arithmetic, where no GPU is needed:
- the tile ranges (cuda/common/block_ranges.h, cuda/bwd/query_blocks.h) against brute force
  (tests/cpp/block_ranges_check.cc). The backward's deterministic mode relies on the
  forward and backward agreeing on every (query tile, key tile) pair; an off-by-one there
  deadlocks the GPU;
- the backward workspace: Python's bwd_workspace_bytes must cover what the kernels carve
  (tests/cpp/workspace_check.cc), or the FFI handler refuses the call;
- the forward's exp2 on the FMA pipe against exp2 (tests/cpp/exp2_on_fma_check.cc);
- the dynamic scheduler's L2 sections (cuda/fwd/tile_order.h): one head per section only
  without a window or under one that hides no key (tests/cpp/tile_order_check.cc).
A checker's output is matched case for case, so one that prints too little fails. Without a
C++ compiler these tests skip, except under CI=true, where they fail."""

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from jax_fa3 import primitives

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compiled_head_dims(direction, dtype="*"):
  """The head dims cuda/instantiations/ compiles for "fwd" or "bwd" (as CMakeLists.txt
  globs them: <direction>_<dtype>_hdim<d>.cu), of one dtype ("e4m3") or all."""
  names = (
    path.name for path in (ROOT / "cuda" / "instantiations").glob(f"{direction}_{dtype}_*.cu")
  )
  return sorted(
    {int(m.group(1)) for m in (re.fullmatch(r".*_hdim(\d+)\.cu", n) for n in names) if m}
  )


def _build(tmp_path, name, defines=()):
  compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if compiler is None:
    if os.environ.get("CI") == "true":  # CI must run these checks, not skip them
      pytest.fail("CI: no C++ compiler (g++, c++ or clang++) for the host-compiled checks")
    pytest.skip("needs a C++ compiler")
  binary = tmp_path / name
  subprocess.run(
    [
      compiler,
      "-std=c++17",
      "-O2",
      f"-I{ROOT / 'cuda'}",
      *defines,
      str(ROOT / "tests" / "cpp" / f"{name}.cc"),
      "-o",
      str(binary),
    ],
    check=True,
  )
  return binary


def test_block_ranges_match_brute_force(tmp_path):
  """Every tile shape of the forward and backward tile tables, at every compiled head dim."""
  fwd, bwd = compiled_head_dims("fwd"), compiled_head_dims("bwd")
  fp8 = compiled_head_dims("fwd", "e4m3")
  assert fwd and bwd and fp8, "no instantiations found under cuda/instantiations/"
  binary = _build(
    tmp_path,
    "block_ranges_check",
    [
      f"-DJAX_FA3_FWD_HEAD_DIMS={','.join(map(str, fwd))}",
      f"-DJAX_FA3_FP8_FWD_HEAD_DIMS={','.join(map(str, fp8))}",
      f"-DJAX_FA3_BWD_HEAD_DIMS={','.join(map(str, bwd))}",
    ],
  )
  result = subprocess.run([str(binary)], capture_output=True, text=True)
  lines = result.stdout.split("\n")
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
    result.stdout + result.stderr
  )
  checked = {tuple(line.split()[1:4]) for line in lines if line.startswith("tile fwd")}
  checked |= {tuple(line.split()[1:3]) for line in lines if line.startswith("tile bwd")}
  windows = ("no-window", "window", "short-window")
  expected = {("fwd", f"d{d}", window) for d in fwd for window in windows}
  expected |= {("fwd-fp8", f"d{d}", window) for d in fp8 for window in windows}
  expected |= {("bwd", f"d{d}") for d in bwd}
  assert checked == expected, result.stdout


def test_python_workspace_covers_the_kernels(tmp_path):
  rng = np.random.default_rng(0)
  cases = []
  for _ in range(500):
    hk = int(rng.choice([1, 2, 4]))
    cases.append(
      (
        int(rng.integers(1, 5)),
        int(rng.integers(1, 3000)),
        int(rng.integers(1, 3000)),
        hk * int(rng.choice([1, 2, 8])),
        hk,
        int(rng.choice([64, 128, 256])),
        int(rng.integers(0, 2)),
        int(rng.integers(0, 2)),
      )
    )
  stdin = "".join(" ".join(map(str, c)) + "\n" for c in cases)
  result = subprocess.run(
    [str(_build(tmp_path, "workspace_check"))],
    input=stdin,
    capture_output=True,
    text=True,
    check=True,
  )
  for (b, sq, sk, h, hk, d, _, sinks), needed in zip(
    cases, _sizes(result.stdout, len(cases)), strict=True
  ):
    assert primitives.bwd_workspace_bytes(b, sq, sk, h, hk, d, d, sinks=bool(sinks)) >= needed, (
      b,
      sq,
      sk,
      h,
      hk,
      d,
      sinks,
    )


def _sizes(stdout, count):
  """workspace_check's sizes, one per case: fewer (a checker that printed nothing) fail."""
  sizes = [int(n) for n in stdout.split()]
  assert len(sizes) == count, f"workspace_check printed {len(sizes)} sizes for {count} cases"
  return sizes


def test_a_checker_that_prints_too_little_fails():
  with pytest.raises(AssertionError, match="printed 0 sizes for 3 cases"):
    _sizes("", 3)


@pytest.mark.parametrize("ci", ["true", None])
def test_a_missing_compiler_fails_in_ci_and_skips_elsewhere(ci, monkeypatch, tmp_path):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  if ci:
    monkeypatch.setenv("CI", ci)
  else:
    monkeypatch.delenv("CI", raising=False)
  outcome = pytest.fail.Exception if ci else pytest.skip.Exception
  with pytest.raises(outcome, match="C\\+\\+ compiler"):
    _build(tmp_path, "workspace_check")


def test_fp8_v_transpose_layouts(tmp_path):
  """The FP8 forward's on-chip V transpose (cuda/fwd/transpose_v.h), emulated on the host
  against cute's layouts (tests/cpp/transpose_v_check.cu): every V^T byte in the key order
  P's registers use, and no shared-memory bank conflicts, at every FP8 head dim."""
  nvcc = shutil.which("nvcc")
  try:
    import cutlass_library
  except ImportError:
    cutlass_library = None
  if nvcc is None or cutlass_library is None:
    missing = (
      "nvcc" if nvcc is None else "nvidia-cutlass (a build requirement; make test installs it)"
    )
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI: {missing} missing for the FP8 transpose check")
    pytest.skip(f"needs {missing}")
  include = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
  binary = tmp_path / "transpose_v_check"
  subprocess.run(
    [
      nvcc,
      "-std=c++17",
      "--expt-relaxed-constexpr",
      "-arch=sm_90a",
      "-x",
      "cu",
      f"-I{ROOT / 'cuda'}",
      f"-I{include}",
      str(ROOT / "tests" / "cpp" / "transpose_v_check.cu"),
      "-o",
      str(binary),
    ],
    check=True,
  )
  result = subprocess.run([str(binary)], capture_output=True, text=True)
  lines = [line for line in result.stdout.splitlines() if line.startswith("d")]
  dims = sorted(int(line.split()[0][1:]) for line in lines)
  assert result.returncode == 0 and dims == compiled_head_dims("fwd", "e4m3"), result.stdout
  for line in lines:
    assert " 0 wrong V^T bytes" in line and line.endswith("ldmatrix 1 stmatrix 1"), line


def test_exp2_on_fma_accuracy(tmp_path):
  """The forward's exp2 on the FMA pipe (cuda/common/exp2_on_fma.h, the FP8 d128 kernel's
  share of its softmax): within 9e-5 of 2^x at every fraction from -126 to 8.5, exact at
  integers, masked scores (-inf) at most 2^-126. (NaN is kept by the softmax's row maximum
  instead: the GPU test of a NaN key.)"""
  binary = _build(tmp_path, "exp2_on_fma_check")
  result = subprocess.run([str(binary)], capture_output=True, text=True)
  assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stdout
  assert "inexact integers 0" in result.stdout


def test_tile_order_sections(tmp_path):
  """A head's m_blocks run together (one head per L2 section) exactly when there is no window
  or it hides no key from any row (checked against brute force); every other call keeps
  L2-sized sections."""
  binary = _build(tmp_path, "tile_order_check")
  result = subprocess.run([str(binary)], check=False, capture_output=True, text=True)
  assert result.returncode == 0 and result.stdout.rstrip().endswith("ok"), result.stdout
  assert "window_hides_no_key 83300 cases" in result.stdout
  assert "one head without a window or under the short-keys window only" in result.stdout
