"""kernels_available() says where the kernels are and whether they run here; the GPU tests'
JAX_FA3_REQUIRE_GPU switch."""

import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from jax_fa3 import _kernels
from jax_fa3._kernels import KernelStatus, Variant

VARIANTS = (Variant("fwd", "bfloat16", "bfloat16", 128, 128),)
TESTS = pathlib.Path(__file__).parent
NO_MODULE = ImportError("No module named 'jax_fa3._fa3_cuda'")


def _has_cuda_device():
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


@pytest.fixture
def installed(monkeypatch, tmp_path):
  """Pretends jax-fa3 is installed in tmp_path/site/jax_fa3, with or without the extension."""

  def install(with_extension):
    package = tmp_path / "site" / "jax_fa3"
    package.mkdir(parents=True)
    if with_extension:
      (package / "_fa3_cuda.cpython-311-x86_64-linux-gnu.so").touch()
    distribution = types.SimpleNamespace(locate_file=lambda name: package.parent / name)
    monkeypatch.setattr(_kernels.importlib.metadata, "distribution", lambda name: distribution)
    return package

  return install


def test_source_tree_shadowing_the_install_is_named(installed, tmp_path):
  site = installed(with_extension=True)
  reason = _kernels._missing_extension_reason(NO_MODULE, tmp_path / "checkout" / "jax_fa3")
  assert f"imported from {tmp_path / 'checkout' / 'jax_fa3'}" in reason
  assert f"shadows the installed package in {site}, which has the CUDA extension" in reason
  assert "python -P" in reason


def test_shadowed_install_without_the_extension_says_so(installed, tmp_path):
  installed(with_extension=False)
  reason = _kernels._missing_extension_reason(NO_MODULE, tmp_path / "checkout" / "jax_fa3")
  assert "which has no CUDA extension either" in reason


def test_install_without_the_extension_says_how_to_build_it(installed):
  site = installed(with_extension=False)
  reason = _kernels._missing_extension_reason(NO_MODULE, site)
  assert "shadows" not in reason
  assert "No module named 'jax_fa3._fa3_cuda'" in reason and "JAX_FA3_CUDA=ON" in reason


def test_not_installed_says_how_to_build_it(monkeypatch, tmp_path):
  def not_found(name):
    raise _kernels.importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(_kernels.importlib.metadata, "distribution", not_found)
  reason = _kernels._missing_extension_reason(NO_MODULE, tmp_path / "jax_fa3")
  assert "shadows" not in reason and "JAX_FA3_CUDA=ON" in reason


def test_from_the_repository_root_the_shadowing_is_reported():
  """The real thing: `import jax_fa3` in the checkout's root picks ./jax_fa3."""
  root = TESTS.parent
  installed_at = pathlib.Path(_kernels.__file__).parent
  if not (root / "jax_fa3").is_dir() or installed_at.resolve() == (root / "jax_fa3").resolve():
    pytest.skip("needs the package installed, and run beside a checkout")
  if list((root / "jax_fa3").glob("_fa3_cuda*")):
    pytest.skip("the checkout holds a built extension, so nothing is shadowed")
  result = subprocess.run(
    [sys.executable, "-c", "import jax_fa3; print(jax_fa3.kernels_available())"],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
    env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")},
  )
  assert f"imported from {root / 'jax_fa3'}, which shadows the installed package" in result.stdout


@pytest.mark.parametrize("nvidia_smi", [None, "/usr/bin/nvidia-smi"])
def test_no_gpu_means_the_reference_path(monkeypatch, nvidia_smi):
  def no_cuda(backend=None):
    raise RuntimeError(f"Unknown backend {backend}")

  monkeypatch.setattr(jax, "devices", no_cuda)
  monkeypatch.setattr(_kernels.shutil, "which", lambda name: nvidia_smi)
  text = str(KernelStatus(VARIANTS))
  assert "fwd bfloat16 head_dim=128" in text
  assert "They will not run here: JAX sees no CUDA GPU" in text
  assert "float32 reference path" in text
  assert ("jax[cuda13]" in text) == (nvidia_smi is not None)


def test_a_gpu_other_than_hopper_means_the_reference_path(monkeypatch):
  gpus = [
    types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
    types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0"),
  ]
  monkeypatch.setattr(jax, "devices", lambda backend=None: gpus)
  assert _kernels.gpus_without_kernels() == ["NVIDIA A100-SXM4-80GB (compute capability 8.0)"]
  problem = _kernels.gpu_problem()
  assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in problem and "H100" not in problem
  assert "float32 reference path" in problem
  assert "They will not run here" in str(KernelStatus(VARIANTS))


def test_hopper_gpus_run_the_kernels(monkeypatch):
  gpus = [types.SimpleNamespace(device_kind="NVIDIA H200", compute_capability="9.0")] * 2
  monkeypatch.setattr(jax, "devices", lambda backend=None: gpus)
  assert _kernels.gpu_problem() is None and _kernels.gpus_without_kernels() == []
  assert "will not run" not in str(KernelStatus(VARIANTS))


def test_on_this_cpu_machine_the_status_says_the_kernels_will_not_run():
  if _has_cuda_device():
    pytest.skip("a CUDA device is present")
  assert "They will not run here: JAX sees no CUDA GPU" in str(KernelStatus(VARIANTS))


def test_require_gpu_turns_the_skip_into_an_error():
  if _has_cuda_device():
    pytest.skip("a CUDA device is present")
  result = subprocess.run(
    [
      sys.executable,
      "-P",
      "-m",
      "pytest",
      "--collect-only",
      "-q",
      "-p",
      "no:cacheprovider",
      str(TESTS / "gpu"),
    ],
    cwd=TESTS.parent,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_FA3_REQUIRE_GPU": "1"},
  )
  assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
  assert "JAX_FA3_REQUIRE_GPU=1, but JAX sees no Hopper GPU" in result.stdout + result.stderr
