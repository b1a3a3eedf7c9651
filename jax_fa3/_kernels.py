"""The compiled Hopper kernels: loads the extension, registers its FFI targets.

The extension `jax_fa3._fa3_cuda` is built only where a CUDA toolkit was found
(see CMakeLists.txt). Its `variants()` table is the one list of what is
compiled; this module reads it and keeps no copy of its own.
"""

import dataclasses
import importlib
import importlib.metadata
import pathlib
import re
import shutil
from typing import Any, Mapping, NamedTuple

import jax
import jaxlib
import numpy as np

FWD_TARGET = "jax_fa3_fwd"
BWD_TARGET = "jax_fa3_bwd"
DECODE_TARGET = "jax_fa3_decode"
# The packed-sequence descriptors (segment_kernels.py).
SEGMENT_ROWS_TARGET = "jax_fa3_segment_rows"
FORWARD_TILES_TARGET = "jax_fa3_forward_tiles"
BACKWARD_PLANS_TARGET = "jax_fa3_backward_plans"


class Variant(NamedTuple):
  """One compiled kernel: direction "fwd"/"bwd"/"decode", the input and output dtype names
  (equal for the 16-bit kernels; FP8 ones read float8_e4m3fn and write bfloat16), q/k and v
  head dims."""

  direction: str
  dtype: str
  out_dtype: str
  head_dim: int
  head_dim_v: int


# The rows one FP8 descale block covers where the extension does not say (not built, or no
# FP8 kernel for that head dim): the kernels' query tile (64) and a key block of 128.
DEFAULT_DESCALE_BLOCK = (64, 128)


@dataclasses.dataclass(frozen=True)
class KernelStatus:
  """What `jax_fa3` can run on an H100. True when any kernel is compiled."""

  variants: tuple[Variant, ...]
  unavailable_reason: str | None = None
  build_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # (direction, dtype name, head_dim) -> (block_m, block_n) of the packed-sequence kernels,
  # whose tile plans segment_kernels.py makes.
  segment_tiles: Mapping[tuple[str, str, int], tuple[int, int]] = dataclasses.field(
    default_factory=dict
  )
  # (dtype name, head_dim) -> (block_n, ctas_per_sm) of the decode kernels, for the
  # split-count heuristic (primitives.decode_num_splits).
  decode_shapes: Mapping[tuple[str, int], tuple[int, int]] = dataclasses.field(default_factory=dict)
  # (dtype name, out dtype name, head_dim) -> (q_block_rows, k_block_rows) of the FP8
  # forward kernels: the query rows and keys one block of descale_q / descale_k covers.
  descale_blocks: Mapping[tuple[str, str, int], tuple[int, int]] = dataclasses.field(
    default_factory=dict
  )
  # The FFI targets the extension registered.
  targets: frozenset[str] = frozenset()

  def __bool__(self):
    return bool(self.variants)

  def __str__(self):
    if not self.variants:
      return f"jax_fa3 CUDA kernels: none ({self.unavailable_reason})"
    lines = [
      f"  {v.direction} {v.dtype}"
      + (f" -> {v.out_dtype}" if v.out_dtype != v.dtype else "")
      + f" head_dim={v.head_dim} head_dim_v={v.head_dim_v}"
      for v in self.variants
    ]
    built = ", ".join(f"{key}={value}" for key, value in self.build_info.items())
    why_not_here = gpu_problem()
    if why_not_here:
      lines.append(f"They will not run here: {why_not_here}")
    return "\n".join(
      [f"jax_fa3 CUDA kernels ({built}):" if built else "jax_fa3 CUDA kernels:", *lines]
    )

  def head_dims_for(
    self, direction: str, dtype, head_dim: int, head_dim_v: int, out_dtype=None
  ) -> tuple[int, int] | None:
    """The smallest compiled (head_dim, head_dim_v) that holds the given ones, or None.
    `out_dtype` defaults to `dtype` (the 16-bit kernels write what they read)."""
    dtype_name = np.dtype(dtype).name
    out_name = dtype_name if out_dtype is None else np.dtype(out_dtype).name
    fits = [
      (v.head_dim, v.head_dim_v)
      for v in self.variants
      if v.direction == direction
      and v.dtype == dtype_name
      and v.out_dtype == out_name
      and v.head_dim >= head_dim
      and v.head_dim_v >= head_dim_v
    ]
    return min(fits, key=lambda dims: (dims[0] + dims[1], dims[0]), default=None)

  def out_dtypes(self, direction: str, dtype) -> tuple[str, ...]:
    """The output dtype names of the compiled kernels that read `dtype`, sorted."""
    dtype_name = np.dtype(dtype).name
    return tuple(
      sorted(
        {v.out_dtype for v in self.variants if v.direction == direction and v.dtype == dtype_name}
      )
    )

  def descale_block(self, dtype, out_dtype, head_dim: int) -> tuple[int, int]:
    """(q_block_rows, k_block_rows) of the FP8 forward kernel for the compiled `head_dim`:
    the query rows and keys one descale block covers. Where no such kernel is compiled
    (the reference path), DEFAULT_DESCALE_BLOCK: 64 query rows, 128 keys."""
    key = (np.dtype(dtype).name, np.dtype(out_dtype).name, head_dim)
    return self.descale_blocks.get(key, DEFAULT_DESCALE_BLOCK)

  def segment_tile(self, direction: str, dtype, head_dim: int) -> tuple[int, int]:
    """The (block_m, block_n) tile of a compiled packed-sequence kernel."""
    return self.segment_tiles[(direction, np.dtype(dtype).name, head_dim)]

  def decode_shape(self, dtype, head_dim: int) -> tuple[int, int]:
    """(keys per CTA step, CTAs per SM) of a compiled decode kernel."""
    return self.decode_shapes[(np.dtype(dtype).name, head_dim)]


def _cuda_devices() -> list:
  try:
    return jax.devices("cuda")
  except RuntimeError:  # no CUDA backend
    return []


def gpus_without_kernels() -> list[str]:
  """The CUDA GPUs JAX sees that cannot run the kernels (any but Hopper, sm_90a), described.
  A device that does not report its compute capability is not listed (jax's CUDA devices
  report it as a string, "9.0" on an H100 or H200)."""
  return sorted(
    {
      f"{d.device_kind} (compute capability {d.compute_capability})"
      for d in _cuda_devices()
      if getattr(d, "compute_capability", None) not in (None, "9.0")
    }
  )


def gpu_problem() -> str | None:
  """Why the kernels cannot run on this machine, or None when every GPU JAX sees is a Hopper.

  Asks JAX for its devices, so call it after jax.distributed.initialize, never at import.
  """
  fallback = "jax_fa3 runs its float32 reference path instead"
  if not _cuda_devices():
    hint = (
      " (nvidia-smi is here: install jax's CUDA wheels, "
      "`pip install 'jax[cuda13]'` or 'jax[cuda12]')"
      if shutil.which("nvidia-smi")
      else ""
    )
    return f"JAX sees no CUDA GPU{hint}; {fallback}."
  others = gpus_without_kernels()
  if others:
    return f"they are built for Hopper (sm_90a), not for {', '.join(others)}; {fallback}."
  return None


def sm_count() -> int:
  """Streaming multiprocessors of the first CUDA GPU (132 on an H200 or H100 SXM when JAX
  does not say)."""
  devices = _cuda_devices()
  return int(getattr(devices[0], "core_count", 0) or 132) if devices else 132


def _missing_extension_reason(error: ImportError, package_dir: pathlib.Path) -> str:
  """Why `jax_fa3._fa3_cuda` did not import: most often the source tree shadows the install."""
  try:
    installed = pathlib.Path(importlib.metadata.distribution("jax-fa3").locate_file("jax_fa3"))
  except importlib.metadata.PackageNotFoundError:
    installed = None
  if installed and installed.is_dir() and installed.resolve() != package_dir.resolve():
    extension = (
      "which has the CUDA extension"
      if any(installed.glob("_fa3_cuda*"))
      else "which has no CUDA extension either"
    )
    return (
      f"jax_fa3 was imported from {package_dir}, which shadows the installed package "
      f"in {installed}, {extension}: Python looks in the current (or the script's) "
      f"directory first. Run from another directory, or with `python -P` "
      f"(PYTHONSAFEPATH=1)"
    )
  return (
    f"the CUDA extension jax_fa3._fa3_cuda could not be imported ({error}); install "
    f"a wheel, or build it with a CUDA toolkit: `JAX_FA3_CUDA=ON pip install .`"
  )


# How jaxlib words its refusal of an FFI handler for the XLA FFI API version the handler was
# compiled for (jaxlib 0.10.2 to 0.12.0.1: "... failed because the handler's API version
# (0.5) is incompatible with the framework's API version (0.4). Minimum supported API version
# is (0.1).").
_FFI_API_REFUSAL = re.compile(
  r"API version \((\d+)\.(\d+)\) is incompatible with the framework's API version "
  r"\((\d+)\.(\d+)\)(?:\. Minimum supported API version is \((\d+\.\d+)\))?"
)


def _dotted(numbers) -> str:
  return ".".join(str(n) for n in numbers)


def _ffi_api_mismatch(extension_api, jaxlib_api, headers_from=None, minimum_api=None) -> str:
  """Why the running jaxlib refuses the extension's FFI handlers, and what to do. A handler
  declares the XLA FFI API version (major, minor) of the headers it was compiled against,
  those of jaxlib `headers_from` where the build recorded it; a jaxlib accepts versions from
  a minimum (`minimum_api`, "0.1", where known) up to its own (`jaxlib_api`)."""
  refused = (
    f"jaxlib {jaxlib.__version__} refuses the CUDA extension's FFI handlers: they were "
    f"compiled for XLA FFI API {_dotted(extension_api)}"
    + (f" (the headers of jaxlib {headers_from})" if headers_from else "")
  )
  if tuple(extension_api) > tuple(jaxlib_api):
    newer = (
      f"jax {headers_from} or newer"
      if headers_from
      else f"a jax whose jaxlib has XLA FFI API {_dotted(extension_api)} or newer"
    )
    return (
      f"{refused}, and it accepts {_dotted(jaxlib_api)} at most. Install {newer}, or rebuild "
      f"jax_fa3 (`pip install .` from its source), whose build compiles against the FFI "
      f"headers of the oldest jaxlib it supports (every later jaxlib accepts those)"
    )
  oldest = f" and {minimum_api} at least" if minimum_api else ""
  return (
    f"{refused}, and it accepts {_dotted(jaxlib_api)} at most{oldest}. Install a jax_fa3 "
    f"release built for this jax, or an older jax"
  )


def _ffi_api_refusal(error: str, headers_from: str | None = None) -> str | None:
  """_ffi_api_mismatch's reason where `error`, from jax.ffi.register_ffi_target, is jaxlib
  refusing a handler for its XLA FFI API version; None for any other error."""
  found = _FFI_API_REFUSAL.search(error)
  if not found:
    return None
  handler_api = (int(found[1]), int(found[2]))
  jaxlib_api = (int(found[3]), int(found[4]))
  return _ffi_api_mismatch(handler_api, jaxlib_api, headers_from, found[5])


def _jaxlib_ffi_api() -> tuple[int, int] | None:
  """The running jaxlib's XLA FFI API version, the newest it accepts from a handler: from
  the headers its wheel ships (None where there are none)."""
  header = pathlib.Path(jaxlib.__file__).parent / "include" / "xla" / "ffi" / "api" / "c_api.h"
  try:
    text = header.read_text()
  except OSError:
    return None
  found = [
    re.search(rf"^#define XLA_FFI_API_{part} (\d+)", text, re.MULTILINE)
    for part in ("MAJOR", "MINOR")
  ]
  return (int(found[0][1]), int(found[1][1])) if all(found) else None


def _built_ffi() -> tuple[str, tuple[int, int]] | None:
  """(jaxlib version, XLA FFI API version) of the headers the extension was compiled
  against, from the module CMakeLists.txt writes beside it (None where it is missing)."""
  try:
    record = importlib.import_module("jax_fa3._ffi_headers")
  except ImportError:
    return None
  return record.JAXLIB_VERSION, tuple(record.FFI_API_VERSION)


def _register(targets: Mapping[str, Any], built: tuple[str, tuple[int, int]] | None) -> str | None:
  """Registers the extension's FFI targets with jax: None, or why the running jaxlib refuses
  them for their XLA FFI API version (`built`: as _built_ffi returns it).

  jax applies a CUDA registration when it starts its CUDA backend, which may come later
  (a refusal then fails inside jax, logged there), so a handler whose FFI API is known to be
  newer than the running jaxlib's is not registered at all."""
  headers_from = built[0] if built else None
  jaxlib_api = _jaxlib_ffi_api()
  if built and jaxlib_api and built[1] > jaxlib_api:
    return _ffi_api_mismatch(built[1], jaxlib_api, headers_from)
  try:
    for name, capsule in targets.items():
      jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
  except jax.errors.JaxRuntimeError as e:
    reason = _ffi_api_refusal(str(e), headers_from)
    if reason is None:
      raise
    return reason
  return None


def _load() -> KernelStatus:
  try:
    _fa3_cuda = importlib.import_module("jax_fa3._fa3_cuda")
  except ImportError as e:
    return KernelStatus((), _missing_extension_reason(e, pathlib.Path(__file__).parent))
  built = _built_ffi()
  targets = _fa3_cuda.registrations()
  refused = _register(targets, built)
  if refused:
    return KernelStatus((), refused)
  variants = tuple(Variant(d, t, o, int(h), int(hv)) for d, t, o, h, hv in _fa3_cuda.variants())
  reason = None if variants else "the extension was built with an empty variant list"
  segment_tiles = {(d, t, int(h)): (int(m), int(n)) for d, t, h, m, n in _fa3_cuda.segment_tiles()}
  decode_shapes = {(t, int(h)): (int(n), int(c)) for t, h, n, c in _fa3_cuda.decode_shapes()}
  descale_blocks = {
    (t, o, int(h)): (int(m), int(n)) for t, o, h, m, n in _fa3_cuda.descale_blocks()
  }
  build_info = dict(_fa3_cuda.build_info())
  if built:
    build_info["xla_ffi"] = f"{_dotted(built[1])} (jaxlib {built[0]} headers)"
  return KernelStatus(
    variants,
    reason,
    build_info,
    segment_tiles,
    decode_shapes,
    descale_blocks,
    frozenset(targets),
  )


_status = _load()


def kernels_available() -> KernelStatus:
  """Which CUDA kernels are compiled into this install, and why none are when none are.

  `bool(jax_fa3.kernels_available())` says whether any is; `print(...)` lists them and
  says when they cannot run on this machine (no GPU, or not a Hopper one).
  Where a (dtype, head dim) pair has no kernel, jax_fa3 runs its float32
  reference instead, with a one-time warning.
  """
  return _status
