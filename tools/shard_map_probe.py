"""Which shard_map programs crash XLA's GPU compiler (a diagnosis tool for issue 7).

Each case runs in its own subprocess, so a segfault marks that case only:
    python tools/shard_map_probe.py            # all cases
    python tools/shard_map_probe.py CASE       # one case, in this process
"""

import os
import subprocess
import sys

CASES = {
    "cudnn_in_shard_map": "jax.nn.dot_product_attention(q, k, v, implementation='cudnn')",
    "ours_in_shard_map": "jax_fa3.flash_attention(q, k, v)",
    "ours_plain_jit": None,
    "ours_in_shard_map_gspmd": "jax_fa3.flash_attention(q, k, v)",
    "ours_in_shard_map_no_cmd_buffer": "jax_fa3.flash_attention(q, k, v)",
    "ffi_call_no_seqused_operands": "ffi",
    "ours_size1_mesh": "jax_fa3.flash_attention(q, k, v)",
}


def run_case(name):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P
  import jax_fa3
  from jax_fa3 import primitives, _kernels

  if name.endswith("gspmd"):
    jax.config.update("jax_use_shardy_partitioner", False)
  devices = jax.devices()[:1] if name == "ours_size1_mesh" else jax.devices()
  mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
  shape = (2 * len(devices), 256, 4, 128)
  q, k, v = (jax.device_put(jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.bfloat16),
                            jax.sharding.NamedSharding(mesh, P("x"))) for i in range(3))

  if name == "ours_plain_jit":
    fn = jax.jit(lambda q, k, v: jax_fa3.flash_attention(q, k, v))
  else:
    def body(q, k, v):
      if name == "ffi_call_no_seqused_operands":
        b, s, h, d = q.shape
        out, _, _ = jax.ffi.ffi_call(_kernels.FWD_TARGET, (
            jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32),
            jax.ShapeDtypeStruct((primitives.fwd_workspace_bytes(),), jnp.uint8)))(
                q, k, v, jnp.full((b,), s, jnp.int32), jnp.full((b,), s, jnp.int32),
                **primitives._ffi_attributes(softmax_scale=0.1, softcap=0.0, window_left=-1,
                                             window_right=-1, diagonal_offset=0))
        return out
      return eval(CASES[name], {"jax": jax, "jax_fa3": jax_fa3, "q": q, "k": k, "v": v})
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 3, out_specs=P("x")))
  print(name, "lowering...", flush=True)
  lowered = fn.lower(q, k, v)
  with open(f"{os.environ.get('OUT', '/tmp')}/probe_{name}.mlir", "w") as f:
    f.write(lowered.as_text())
  print(name, "compiling...", flush=True)
  compiled = lowered.compile()
  out = compiled(q, k, v)
  print(name, "ran: finite", bool(jnp.isfinite(out.astype(jnp.float32)).all()), flush=True)


def main():
  if len(sys.argv) > 1:
    run_case(sys.argv[1])
    return
  for name in CASES:
    env = dict(os.environ)
    if name.endswith("no_cmd_buffer"):
      env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    result = subprocess.run([sys.executable, "-X", "faulthandler", __file__, name], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    print(f"== {name}: exit {result.returncode}\n   " + "\n   ".join(tail), flush=True)


if __name__ == "__main__":
  main()
