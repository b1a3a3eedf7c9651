"""How long a JAX function takes: CUPTI kernel time on a GPU, wall-clock time elsewhere.

Importable on its own (the notebook uses it):
    from timing import time_ms, timing_method
"""

import statistics
import time

import jax


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def timing_method(iterations: int) -> str:
  """A line for result headers saying how `time_ms` measures here."""
  if on_gpu():
    return f"CUPTI kernel time (median of {iterations} runs)"
  return f"wall-clock time (median of {iterations} runs)"


def time_ms(fn, *args, iterations: int = 10) -> float:
  """Median time of `fn(*args)` in milliseconds, after one warm-up run (which compiles it).

  On a GPU this is the summed time of the kernels each call launches, read with CUPTI
  (`jax.experimental.mosaic.gpu.profiler.measure`), so host overhead is excluded.
  Elsewhere it is wall-clock time of the jitted call.
  """
  if on_gpu():
    return kernel_time_ms(fn, *args, iterations=iterations)
  return wall_time_ms(fn, *args, iterations=iterations)


def kernel_time_ms(fn, *args, iterations: int = 10) -> float:
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=import-outside-toplevel

  _, per_run = profiler.measure(fn, iterations=iterations)(*args)
  if per_run is None:
    raise RuntimeError("the function launched no GPU kernel")
  return statistics.median(per_run if iterations > 1 else [per_run])


def wall_time_ms(fn, *args, iterations: int = 10) -> float:
  compiled = jax.jit(fn)
  jax.block_until_ready(compiled(*args))
  per_run = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    per_run.append((time.perf_counter() - start) * 1e3)
  return statistics.median(per_run)
