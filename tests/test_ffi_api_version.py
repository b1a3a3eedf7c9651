"""A jaxlib refuses FFI handlers compiled against a newer jaxlib's XLA FFI headers (the
handler's FFI API version is newer than its own): jax_fa3 then reports why, naming the
versions and the fix, in kernels_available() and where it would lower to CUDA."""

import ctypes
import importlib
import os
import re
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from jax_fa3 import _kernels, primitives

# What jax 0.11.2 said when registering an extension built against jaxlib 0.12.0.1's headers.
REFUSED = (
  "INVALID_ARGUMENT: XLA FFI handler registration for jax_fa3_fwd on platform CUDA "
  "(canonical cuda) failed because the handler's API version (0.5) is incompatible with the "
  "framework's API version (0.4). Minimum supported API version is (0.1)."
)
# The XLA FFI API version in the headers of each jaxlib (xla/ffi/api/c_api.h).
FFI_API = {"0.10.2": (0, 3), "0.11.2": (0, 4), "0.12.0.1": (0, 5)}


def _running_ffi_api():
  api = _kernels._jaxlib_ffi_api()  # pylint: disable=protected-access
  if api is None:
    pytest.skip(f"jaxlib {jaxlib.__version__} ships no XLA FFI headers")
  return api


def test_the_refusal_names_both_versions_and_the_fix():
  reason = _kernels._ffi_api_refusal(REFUSED, "0.12.0.1")  # pylint: disable=protected-access
  assert f"jaxlib {jaxlib.__version__} refuses the CUDA extension's FFI handlers" in reason
  assert "compiled for XLA FFI API 0.5 (the headers of jaxlib 0.12.0.1)" in reason
  assert "it accepts 0.4 at most" in reason
  assert "Install jax 0.12.0.1 or newer, or rebuild jax_fa3 (`pip install .`" in reason


def test_without_the_builds_record_the_fix_names_the_ffi_api_version():
  """An extension built before the build recorded its headers' jaxlib."""
  reason = _kernels._ffi_api_refusal(REFUSED)  # pylint: disable=protected-access
  assert "compiled for XLA FFI API 0.5, and it accepts 0.4 at most" in reason
  assert "Install a jax whose jaxlib has XLA FFI API 0.5 or newer" in reason


def test_a_handler_older_than_jaxlib_supports_is_told_apart():
  text = REFUSED.replace("(0.5) is", "(0.1) is").replace("is (0.1).", "is (0.2).")
  reason = _kernels._ffi_api_refusal(text, "0.10.2")  # pylint: disable=protected-access
  assert "compiled for XLA FFI API 0.1 (the headers of jaxlib 0.10.2)" in reason
  assert "it accepts 0.4 at most and 0.2 at least" in reason
  assert "or an older jax" in reason and "or newer" not in reason


def test_other_registration_errors_are_raised_as_they_are(monkeypatch):
  duplicate = (
    "INVALID_ARGUMENT: Duplicate FFI handler registration for jax_fa3_fwd on platform CUDA "
    "(canonical cuda) with different bundle addresses"
  )
  assert _kernels._ffi_api_refusal(duplicate) is None  # pylint: disable=protected-access

  def refuse(name, capsule, platform):
    raise jax.errors.JaxRuntimeError(duplicate)

  monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
  with pytest.raises(jax.errors.JaxRuntimeError, match="Duplicate FFI handler"):
    _kernels._register({"jax_fa3_fwd": object()}, None)  # pylint: disable=protected-access


def test_the_running_jaxlibs_ffi_api_version_is_read_from_its_headers():
  api = _running_ffi_api()
  if jaxlib.__version__ in FFI_API:
    assert api == FFI_API[jaxlib.__version__]
  else:  # a newer jaxlib than this file knows
    assert api > FFI_API["0.12.0.1"]


def _fake_extension(monkeypatch, built, registered):
  """An extension whose headers' record says `built`; `registered` collects what jax got."""
  extension = types.SimpleNamespace(
    registrations=lambda: {"jax_fa3_fwd": object(), "jax_fa3_bwd": object()},
    variants=lambda: [("fwd", "bfloat16", "bfloat16", 128, 128)],
    segment_tiles=lambda: [],
    decode_shapes=lambda: [],
    descale_blocks=lambda: [],
    build_info=lambda: {"arch": "sm_90a"},
  )
  record = types.SimpleNamespace(JAXLIB_VERSION=built[0], FFI_API_VERSION=built[1])
  modules = {"jax_fa3._fa3_cuda": extension, "jax_fa3._ffi_headers": record}
  import_module = importlib.import_module
  monkeypatch.setattr(
    importlib, "import_module", lambda name, *a: modules.get(name) or import_module(name, *a)
  )
  monkeypatch.setattr(
    jax.ffi, "register_ffi_target", lambda name, capsule, platform: registered.append(name)
  )


def test_a_handler_newer_than_the_running_jaxlib_is_not_registered(monkeypatch):
  """jax may apply a CUDA registration only when it starts its CUDA backend, where a refusal
  fails inside jax: so jax_fa3 does not register what the running jaxlib would refuse."""
  major, minor = _running_ffi_api()
  registered = []
  _fake_extension(monkeypatch, ("9.9.9", (major, minor + 1)), registered)
  status = _kernels._load()  # pylint: disable=protected-access
  assert registered == [] and not status and status.targets == frozenset()
  text = str(status)
  assert text.startswith("jax_fa3 CUDA kernels: none (jaxlib ")
  assert f"compiled for XLA FFI API {major}.{minor + 1} (the headers of jaxlib 9.9.9)" in text
  assert f"it accepts {major}.{minor} at most. Install jax 9.9.9 or newer" in text

  # Where it would run a kernel, jax_fa3 raises with the same reason.
  monkeypatch.setattr(_kernels, "_status", status)
  q = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  with pytest.raises(RuntimeError, match=r"cannot lower to CUDA: jaxlib .* refuses the CUDA"):
    primitives._kernel_head_dims("fwd", q, q)  # pylint: disable=protected-access


def test_a_handler_of_the_running_jaxlibs_version_is_registered(monkeypatch):
  api = _running_ffi_api()
  registered = []
  _fake_extension(monkeypatch, ("0.10.2", api), registered)
  status = _kernels._load()  # pylint: disable=protected-access
  assert sorted(registered) == ["jax_fa3_bwd", "jax_fa3_fwd"] and status
  assert status.build_info["xla_ffi"] == f"{api[0]}.{api[1]} (jaxlib 0.10.2 headers)"


PROBE = """
#include "xla/ffi/api/ffi.h"
static xla::ffi::Error Probe() { return xla::ffi::Error::Success(); }
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFa3Probe, Probe, xla::ffi::Ffi::Bind());
"""


def test_the_running_jaxlibs_own_refusal_is_recognized(tmp_path):
  """The real thing, on the CPU: a handler compiled against the running jaxlib's FFI headers
  with their minor version raised by one is refused by this jaxlib, in words that
  _ffi_api_refusal recognizes (the CUDA registration goes through the same check)."""
  compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if compiler is None:
    if os.environ.get("CI") == "true":
      pytest.fail("CI: no C++ compiler (g++, c++ or clang++) for the FFI probe")
    pytest.skip("needs a C++ compiler")
  major, minor = _running_ffi_api()
  include = tmp_path / "include"
  shutil.copytree(os.path.join(os.path.dirname(jaxlib.__file__), "include"), include)
  c_api = include / "xla" / "ffi" / "api" / "c_api.h"
  text, count = re.subn(
    r"^#define XLA_FFI_API_MINOR \d+",
    f"#define XLA_FFI_API_MINOR {minor + 1}",
    c_api.read_text(),
    flags=re.MULTILINE,
  )
  assert count == 1
  c_api.write_text(text)
  (tmp_path / "probe.cc").write_text(PROBE)
  library = tmp_path / "probe.so"
  subprocess.run(
    [compiler, "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", "-o", str(library)]
    + [str(tmp_path / "probe.cc")],
    check=True,
  )
  handler = jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(library)).JaxFa3Probe)
  jax.devices("cpu")  # the CPU backend applies registrations at once once it is up
  with pytest.raises(jax.errors.JaxRuntimeError) as refusal:
    jax.ffi.register_ffi_target("jax_fa3_ffi_api_probe", handler, platform="cpu")
  reason = _kernels._ffi_api_refusal(str(refusal.value))  # pylint: disable=protected-access
  assert reason is not None, str(refusal.value)
  assert f"compiled for XLA FFI API {major}.{minor + 1}, and it accepts {major}.{minor}" in reason
