"""The safeguards of the GPU tests, the benchmarks and CI, checked on the CPU: each must fail
loudly rather than let a run pass that checked less than it says."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import kernel_ffi  # noqa: E402  (importing it needs no GPU)


def test_gpu_tests_force_nan_poisoning(monkeypatch):
  """An inherited JAX_FA3_DEBUG_POISON=0 must not switch off the poisoning of kernel outputs
  that makes unwritten elements show as NaN in the GPU tests."""
  monkeypatch.setenv("JAX_FA3_DEBUG_POISON", "0")
  spec = importlib.util.spec_from_file_location(
    "gpu_conftest", ROOT / "tests" / "gpu" / "conftest.py"
  )
  spec.loader.exec_module(importlib.util.module_from_spec(spec))
  assert os.environ["JAX_FA3_DEBUG_POISON"] == "1"


def test_kernel_ffi_registration_errors_stop_the_tests(monkeypatch):
  """XLA refuses a second, different handler under a taken name (say, JAX_FA3_EXT_DIR's build
  beside the installed one): kernel_ffi must raise, not run the other build's kernels."""

  class Extension:
    __file__ = "/elsewhere/_fa3_cuda.so"

    @staticmethod
    def registrations():
      return {"jax_fa3_fwd": object()}

  def refuse(name, capsule, platform):
    raise ValueError(
      f"Duplicate FFI handler registration for {name} on platform {platform} "
      "with different bundle addresses"
    )

  monkeypatch.setattr(kernel_ffi, "extension", lambda: Extension)
  monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
  kernel_ffi._registered.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(
      RuntimeError,
      match=r"'jax_fa3_fwd' of /elsewhere/_fa3_cuda.so failed: "
      r"Duplicate FFI handler registration",
    ):
      kernel_ffi._registered()  # pylint: disable=protected-access
  finally:
    kernel_ffi._registered.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def scaling(monkeypatch):
  """benchmarks/scaling.py, imported with the benchmarks on the path (it sets an NCCL
  variable at import: restored afterwards)."""
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  monkeypatch.setenv("NCCL_NVLS_ENABLE", os.environ.get("NCCL_NVLS_ENABLE", "0"))
  import scaling as module  # pylint: disable=import-outside-toplevel

  return module


def test_scaling_reports_the_points_that_fail(scaling, monkeypatch, tmp_path):
  """A point that raises is listed with its error in the records' files and makes the run
  fail at the end, instead of vanishing from the tables."""
  problem = scaling.Problem(1, 256, 2, 32, False, "bfloat16")
  points = [
    scaling.Point("ring", "fwd", "sequence", "contiguous", devices, problem) for devices in (1, 2)
  ]

  def timed(point):
    if point.devices == 2:
      raise RuntimeError("XLA compilation failed\nmore detail")
    return (lambda: None), ()

  monkeypatch.setattr(scaling, "timed", timed)
  monkeypatch.setattr(scaling, "wall_time_ms", lambda fn, *args, iterations: 2.0)
  records, failures = scaling.run(points, iterations=1)
  assert [r["devices"] for r in records] == [1]
  assert failures == [
    dict(
      sweep="ring",
      mode="fwd",
      split="sequence",
      layout="contiguous",
      strategy="-",
      devices=2,
      batch=1,
      seqlen=256,
      heads=2,
      head_dim=32,
      causal=False,
      dtype="bfloat16",
      error="RuntimeError: XLA compilation failed",
    )
  ]
  scaling.write(tmp_path, "header", records, failures)
  assert json.loads((tmp_path / "scaling.json").read_text())["failures"] == failures
  assert "## FAILED: 1 points, not measured" in (tmp_path / "scaling.md").read_text()

  monkeypatch.setattr(
    scaling,
    "timed",
    lambda point: (
      timed(point) if not point.problem.causal else timed(dataclasses.replace(point, devices=2))
    ),
  )
  with pytest.raises(SystemExit, match="2 of 4 points failed"):
    scaling.main(
      ["--sweeps", "ring", "--devices", "1", "--seqlens", "256", "--out", str(tmp_path / "run")]
    )


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_fails_the_cuda_compile_check_without_nvcc(ci, tmp_path):
  """.ci/run's cuda_build: under CI=true a machine without nvcc fails the compile check
  (CI promises nvcc); elsewhere the kernels are skipped (OFF) with a note."""
  script = (ROOT / ".ci" / "run").read_text()
  function = script[script.index("cuda_build() {") :]
  function = function[: function.index("\n}\n") + 3]
  result = subprocess.run(
    [shutil.which("bash"), "-c", function + "cuda_build"],
    capture_output=True,
    text=True,
    env=dict(PATH=str(tmp_path), CI=ci),
  )  # no nvcc on PATH
  if ci:
    assert result.returncode == 1 and "cannot run" in result.stderr, result
  else:
    assert (
      result.returncode == 0 and result.stdout.strip() == "OFF" and "skipping" in result.stderr
    ), result
