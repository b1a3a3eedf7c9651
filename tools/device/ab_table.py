"""Reads an A/B log and prints, cell by cell, each build's mean time against a base build's.

An A/B call runs a benchmark (benchmarks/bench.py, fp8.py, decode.py) once per build, in
an order like base, new, new, base, and prefixes each result line with LABEL_RUN:

    base_1 [  3/12] jax_fa3  d=128 batch=1  seqlen_k=8192  page=0   11.9 us   2835 GB/s

A cell is the text between the progress counter and the time (implementation and shape,
spaces collapsed); its time is the first "<number> ms" or "<number> us" after it.

    python tools/device/ab_table.py LOG BASE:NEW [BASE:OTHER ...]

prints, for each pair, every cell both builds ran: the mean times, and how much faster the
new build is in percent (positive: faster; the same formula as NOTES' tables,
base time / new time - 1), with each run's time so that the spread shows.
"""

import collections
import re
import sys

LINE = re.compile(
  r"^(?P<label>\S+?)_(?P<run>\d+)\s+\[\s*\d+/\d+\]\s+(?P<cell>.*?)\s+(?P<time>[\d.]+) (?P<unit>ms|us)\b"
)


def read(lines):
  """{(label, cell): [time in us, ...]} from the labelled result lines."""
  times = collections.defaultdict(list)
  for line in lines:
    match = LINE.match(line)
    if match:
      scale = 1e3 if match["unit"] == "ms" else 1.0
      cell = " ".join(match["cell"].split())
      times[(match["label"], cell)].append(float(match["time"]) * scale)
  return times


def compare(times, base, new):
  """Lines of the base:new comparison, one per cell both ran."""
  cells = [cell for label, cell in times if label == new and (base, cell) in times]
  rows = [f"== {new} against {base} (us, mean of runs; + = {new} faster)"]
  for cell in cells:
    b, n = times[(base, cell)], times[(new, cell)]
    mb, mn = sum(b) / len(b), sum(n) / len(n)
    rows.append(f"  {cell:60} {mb:10.2f} {mn:10.2f} {100 * (mb / mn - 1):+6.1f}%   {b} {n}")
  if not cells:
    rows.append("  (no cell that both ran)")
  return rows


def main(argv):
  if len(argv) < 2 or any(":" not in pair for pair in argv[1:]):
    sys.exit(__doc__)
  with open(argv[0]) as log:
    times = read(log)
  for pair in argv[1:]:
    print("\n".join(compare(times, *pair.split(":", 1))))


if __name__ == "__main__":
  main(sys.argv[1:])
