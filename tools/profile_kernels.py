"""One call of each kernel family for a profiler to look at (tools/profile.sh,
tools/profile_source.sh). Each implementation runs twice: profile the second launch.

python tools/profile_kernels.py [--mode forward|backward|fp8|decode] [--head-dims 128 256]
                                [--seqlen 8192] [--batch 1] [--causal] [--cudnn] [--fa3]

- forward: flash_attention's forward in bf16 (16k tokens, 2048 hidden: the paper sweep's sizes);
- backward: forward + backward of flash_attention in bf16 (same sizes);
  for both, --fa3 adds FlashAttention-3's own kernels (the flash-attn3-jax wheel, d128 only);
- fp8: the FP8 forward on e4m3 inputs with per-head descales (benchmarks/fp8.py's inputs);
  with --cudnn also cuDNN's FP8 forward;
- decode: flash_attention_with_kvcache, one token appended (benchmarks/decode.py's inputs,
  32/8 heads, cache of --seqlen keys, paged with --page-size), two calls threaded per run;
  with --cudnn also jax.nn's cuDNN attention on it (contiguous caches only).
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import jax_fa3


def bf16_calls(head_dim, seqlen, causal, cudnn, fa3, backward):
  shape = (16384 // seqlen, seqlen, 2048 // head_dim, head_dim)
  q, k, v, dout = (
    jax.random.normal(key, shape, jnp.bfloat16)
    for key in jax.random.split(jax.random.key(head_dim), 4)
  )
  impls = {"jax_fa3": lambda q, k, v: jax_fa3.flash_attention(q, k, v, causal=causal)}
  if cudnn:
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="cudnn"
    )
  if fa3 and head_dim == 128:
    import flash_attn3_jax  # FlashAttention-3's own kernels (carried wheel)

    impls["fa3"] = lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=causal)
  for name, attention in impls.items():
    if backward:
      yield (
        name,
        jax.jit(lambda q, k, v, dout, f=attention: jax.vjp(f, q, k, v)[1](dout)),
        (q, k, v, dout),
      )
    else:
      yield name, jax.jit(attention), (q, k, v)


def fp8_calls(head_dim, seqlen, cudnn):
  import fp8  # benchmarks/fp8.py: its inputs and calls

  problem = fp8.Problem(head_dim, seqlen, fp8.HIDDEN // head_dim, 16384 // seqlen, causal=False)
  q, k, v = problem.inputs()
  for impl in ("jax_fa3", "cudnn_fp8") if cudnn else ("jax_fa3",):
    fn, args = fp8.timed_call(impl, problem, q, k, v)
    yield impl, jax.jit(fn), args


def decode_calls(head_dim, seqlen, batch, cudnn, page_size=0):
  import decode  # benchmarks/decode.py: its inputs

  q, k_cache, v_cache, lengths, (k_new, v_new), table = decode.Decode(
    batch, seqlen, 32, 8, head_dim, page_size
  ).inputs()
  # Two calls threaded per run: the second launch of the decode kernel is the first clean one
  # (the first follows XLA's copy of the undonated caches; decode.attend_threaded).
  yield (
    "jax_fa3",
    jax.jit(lambda q, k, v, n, kn, vn, t: decode.attend_threaded(q, k, v, n, kn, vn, t, calls=2)),
    (q, k_cache, v_cache, lengths, k_new, v_new, table),
  )
  if cudnn and not page_size:
    attend = jax.jit(
      lambda q, k, v, n: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=n, implementation="cudnn"
      )
    )
    yield "cudnn", attend, (q, k_cache, v_cache, lengths + 1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
    "--mode", choices=("forward", "backward", "fp8", "decode"), default="backward"
  )
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--seqlen", type=int, default=8192)
  parser.add_argument("--batch", type=int, default=1, help="decode only")
  parser.add_argument(
    "--page-size", type=int, default=0, help="decode only: a paged cache (0: contiguous)"
  )
  parser.add_argument(
    "--cudnn", action="store_true", help="also cuDNN's kernel for the same inputs"
  )
  parser.add_argument("--fa3", action="store_true", help="forward/backward: also FA3's own kernels")
  parser.add_argument("--causal", action="store_true", help="forward/backward: causal")
  args = parser.parse_args()
  for head_dim in args.head_dims:
    if args.mode in ("forward", "backward"):
      calls = bf16_calls(
        head_dim, args.seqlen, args.causal, args.cudnn, args.fa3, args.mode == "backward"
      )
    elif args.mode == "fp8":
      calls = fp8_calls(head_dim, args.seqlen, args.cudnn)
    else:
      calls = decode_calls(head_dim, args.seqlen, args.batch, args.cudnn, args.page_size)
    for name, fn, fn_args in calls:
      for _ in range(2):
        jax.block_until_ready(fn(*fn_args))
      print(f"{args.mode} {name} d{head_dim} s{args.seqlen}: done", flush=True)


if __name__ == "__main__":
  main()
