"""Runs single forward-kernel configs in subprocesses with a timeout, to tell a hang
from an error from a pass without losing the whole device call. Prints one line each.

Usage: python3 tools/device/repro_configs.py EXT_DIR "dtype,d,b,sq,sk,h,hk,wl,wr,softcap,diag" ..."""

import os
import subprocess
import sys

CHILD = r"""
import math, sys, time
sys.path.insert(0, "tests/gpu")
import jax, jax.numpy as jnp, numpy as np
import kernel_ffi
dt, d, b, sq, sk, h, hk, wl, wr, cap, diag = sys.argv[1].split(",")
d, b, sq, sk, h, hk, wl, wr = map(int, (d, b, sq, sk, h, hk, wl, wr)); cap = float(cap)
diag = sk - sq if diag == "br" else int(diag)
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (b, sq, h, d), dt); k = jax.random.normal(ks[1], (b, sk, hk, d), dt)
v = jax.random.normal(ks[2], (b, sk, hk, d), dt)
kw = dict(softmax_scale=1 / math.sqrt(d), softcap=cap, window=(wl, wr), diagonal_offset=diag)
t = time.time()
out, lse = jax.jit(lambda q, k, v: kernel_ffi.fwd(q, k, v, **kw))(q, k, v)
out = np.asarray(out, np.float32)
ref, _ = kernel_ffi.attention(q, k, v, **kw)
err = float(np.max(np.abs(out - np.asarray(ref))))
print(f"ok err={err:.2e} nan={int(np.isnan(out).sum())} {time.time() - t:.1f}s")
"""


def main():
  ext_dir, configs = sys.argv[1], sys.argv[2:]
  env = dict(os.environ, JAX_FA3_EXT_DIR=ext_dir, JAX_FA3_DEBUG_POISON="1")
  for config in configs:
    try:
      r = subprocess.run(
        [sys.executable, "-c", CHILD, config],
        env=env,
        capture_output=True,
        text=True,
        timeout=float(os.environ.get("REPRO_TIMEOUT", 40)),
      )
      lines = (r.stdout + r.stderr).strip().splitlines()
      result = lines[-1] if lines else f"rc={r.returncode}"
    except subprocess.TimeoutExpired:
      result = "HANG (timeout)"
    print(f"{config:45s} {result[:200]}", flush=True)


if __name__ == "__main__":
  main()
