"""What ptxas made of a kernel, read without a GPU: per-kernel counts from its SASS.

    python tools/sass_summary.py build/device/CMakeFiles/fa3_kernels.dir/cuda/instantiations/bwd_bf16_hdim128.cu.o
    python tools/sass_summary.py A.o B.o --kernel bwd_kernel      # two builds, kernel by kernel
    python tools/sass_summary.py A.o --kernel "Li128ELb0" --trace  # the kernel's op sequence

Inputs are object files, shared libraries or cubins (read with `cuobjdump -sass`), or text
files that already hold such a listing. For each kernel: its instructions, HGMMAs (WGMMA),
MUFU.EX2 (exp2), the spill instructions (LDL/STL) in all and between its first and last
HGMMA (the main loop, roughly), and the named-barrier syncs. Given two inputs, kernels of
the same name are printed side by side. `--trace` prints the sequence of the instructions
that shape a pipelined kernel (GEMMs, their waits, barriers, exp2, shared-memory traffic),
runs of one op collapsed to `OPxN`: the order ptxas actually chose, for comparing with
the source's intent (benchmarks/NOTES.md has examples).
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys

# One SASS instruction line: /*addr*/  [@P] OP.MODS operands ;
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);")
FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.MULTILINE)
# Ops that --trace keeps: what orders a warp-specialised, pipelined kernel.
# Prefixes: "LDS"/"STS" also keep LDSM/STSM, "WARPGROUP" the arrives and the waits.
TRACE_OPS = (
  "HGMMA",
  "WARPGROUP",
  "BAR",
  "MEMBAR",
  "SYNCS",
  "FENCE",
  "MUFU",
  "LDS",
  "STS",
  "UTMA",
  "UBLK",
)


def find_cuobjdump():
  """cuobjdump from $CUOBJDUMP, PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel."""
  candidates = [
    os.environ.get("CUOBJDUMP"),
    shutil.which("cuobjdump"),
    "/usr/local/cuda/bin/cuobjdump",
  ]
  for site in sys.path:
    candidates += [str(p) for p in pathlib.Path(site).glob("nvidia/cu*/bin/cuobjdump")]
  for candidate in candidates:
    if candidate and os.access(candidate, os.X_OK):
      return candidate
  raise SystemExit(
    "sass_summary: no cuobjdump found (set CUOBJDUMP, install the CUDA toolkit or "
    "`pip install nvidia-cuda-cuobjdump`), or pass a text file holding `cuobjdump -sass` output"
  )


def read_listing(path):
  """The SASS listing of `path`: the file itself if it is text, else cuobjdump's."""
  data = pathlib.Path(path).read_bytes()
  if b"\0" not in data[:4096]:
    return data.decode("utf-8", "replace")
  result = subprocess.run(
    [find_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=False
  )
  if result.returncode != 0:
    raise SystemExit(f"sass_summary: cuobjdump failed on {path}: {result.stderr.strip()[:300]}")
  return result.stdout


def opcode(instruction):
  """The opcode with its modifiers, past a predicate guard (`@P0 BRA` -> `BRA`)."""
  words = instruction.split()
  if not words:
    return ""
  return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def kernels(listing):
  """{mangled name: [instruction text, ...]} for every function in a listing."""
  marks = list(FUNCTION.finditer(listing))
  found = {}
  for mark, following in zip(marks, marks[1:] + [None]):
    body = listing[mark.end() : following.start() if following else len(listing)]
    found.setdefault(mark.group(1), []).extend(INSTRUCTION.findall(body))
  return found


def summary(instructions):
  """Counts that say how a kernel compiled (see the module docstring)."""
  ops = [opcode(i) for i in instructions]
  gemms = [k for k, op in enumerate(ops) if op.startswith("HGMMA")]
  loop = ops[gemms[0] : gemms[-1] + 1] if gemms else []

  def spills(span):
    return sum(op.startswith(("LDL", "STL")) for op in span)

  return {
    "instructions": len(ops),
    "hgmma": len(gemms),
    "exp2": sum(op.startswith("MUFU.EX2") for op in ops),
    "spill_ops": spills(ops),
    "spill_ops_in_loop": spills(loop),
    "loop_span": len(loop),
    "bar_sync": sum(op.startswith("BAR.SYNC") for op in ops),
  }


def trace(instructions):
  """The kernel's shaping ops in order, runs collapsed (`HGMMA.64x64x16.F32.BF16x8`)."""
  kept = [op for op in map(opcode, instructions) if op.startswith(TRACE_OPS)]
  runs = []
  for op in kept:
    if runs and runs[-1][0] == op:
      runs[-1][1] += 1
    else:
      runs.append([op, 1])
  return " ".join(op if n == 1 else f"{op}x{n}" for op, n in runs)


def demangle(names):
  """Readable names through c++filt where it exists, else the mangled ones."""
  tool = shutil.which("c++filt")
  if not tool or not names:
    return dict(zip(names, names))
  result = subprocess.run(
    [tool], input="\n".join(names), capture_output=True, text=True, check=False
  )
  readable = result.stdout.splitlines()
  return dict(zip(names, readable)) if len(readable) == len(names) else dict(zip(names, names))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "inputs", nargs="+", help="object files, shared libraries, cubins or SASS text files"
  )
  parser.add_argument(
    "--kernel", default="", help="only kernels whose mangled or demangled name matches this regex"
  )
  parser.add_argument("--trace", action="store_true", help="also print each kernel's op sequence")
  parser.add_argument(
    "--width", type=int, default=110, help="characters of a kernel's name to print"
  )
  args = parser.parse_args(argv)

  listings = [kernels(read_listing(path)) for path in args.inputs]
  names = sorted({name for listing in listings for name in listing})
  readable = demangle(names)
  pattern = re.compile(args.kernel)
  chosen = [n for n in names if pattern.search(n) or pattern.search(readable[n])]
  if not chosen:
    raise SystemExit(f"sass_summary: no kernel matches {args.kernel!r} in {', '.join(args.inputs)}")

  fields = list(summary([]))
  header = "input".ljust(12) + "".join(f"{f:>18}" for f in fields)
  # Inputs are labelled #1, #2, ... (builds of one file often share its name).
  tags = [f"#{i}" for i in range(1, len(args.inputs) + 1)]
  labels = [f"{tag} {pathlib.Path(path).name}"[:12] for tag, path in zip(tags, args.inputs)]
  if len(args.inputs) > 1:
    for tag, path in zip(tags, args.inputs):
      print(f"{tag} = {path}")
    print()
  for name in chosen:
    print(readable[name][: args.width])
    print("  " + header)
    for label, listing in zip(labels, listings):
      if name not in listing:
        print(f"  {label:12}  (not in this input)")
        continue
      counts = summary(listing[name])
      print(f"  {label:12}" + "".join(f"{counts[f]:>18}" for f in fields))
      if args.trace:
        print(f"    trace: {trace(listing[name])}")
    print()


if __name__ == "__main__":
  main()
