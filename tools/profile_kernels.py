"""One backward (and forward) call per head dim, for a profiler to look at (tools/profile.sh).

python tools/profile_kernels.py [--head-dims 128 256] [--seqlen 8192] [--cudnn]
"""

import argparse

import jax
import jax.numpy as jnp

import jax_fa3


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--seqlen", type=int, default=8192)
  parser.add_argument("--cudnn", action="store_true", help="also jax.nn's cuDNN attention")
  args = parser.parse_args()
  for head_dim in args.head_dims:
    shape = (16384 // args.seqlen, args.seqlen, 2048 // head_dim, head_dim)
    q, k, v, dout = (
      jax.random.normal(key, shape, jnp.bfloat16)
      for key in jax.random.split(jax.random.key(head_dim), 4)
    )
    impls = {"jax_fa3": jax_fa3.flash_attention}
    if args.cudnn:
      impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    for name, attention in impls.items():
      step = jax.jit(lambda q, k, v, dout, f=attention: jax.vjp(f, q, k, v)[1](dout))
      jax.block_until_ready(step(q, k, v, dout))
      print(f"{name} d{head_dim} s{args.seqlen}: done", flush=True)


if __name__ == "__main__":
  main()
