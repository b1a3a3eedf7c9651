"""Reads Nsight Compute's source page (tools/profile_source.sh) and prints where warps stall:
totals by reason, then the instructions with the most samples, with their neighbours.

    python tools/stall_report.py stalls_d128.csv [--top 25] [--context 3]
"""

import argparse
import collections
import csv


def load(path):
  rows = list(csv.reader(open(path)))
  header = rows[1]
  reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
  out = []
  for row in rows[2:]:
    if len(row) < len(header):
      continue
    samples = int(row[header.index("Warp Stall Sampling (All Samples)")] or 0)
    by_reason = {header[i][6:]: int(row[i] or 0) for i in reasons if row[i] not in ("", "0")}
    executed = int(row[header.index("Instructions Executed")] or 0)
    out.append((row[1].strip(), samples, by_reason, executed))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("csv")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--context", type=int, default=2)
  args = parser.parse_args()
  sass = load(args.csv)
  total = sum(s for _, s, _, _ in sass)
  reasons = collections.Counter()
  for _, _, by_reason, _ in sass:
    reasons.update(by_reason)
  print(f"{total} samples over {len(sass)} instructions")
  for reason, n in reasons.most_common(12):
    print(f"  {reason:20s} {n:8d} {100 * n / total:5.1f}%")
  ranked = sorted(range(len(sass)), key=lambda i: -sass[i][1])[: args.top]
  print(f"\ntop {args.top} instructions (index: samples %, reasons, executed)")
  for i in sorted(ranked):
    for j in range(max(0, i - args.context), min(len(sass), i + 1)):
      text, samples, by_reason, executed = sass[j]
      mark = ">>" if j == i else "  "
      top = ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:3])
      print(f"{mark}{j:5d} {100 * samples / total:5.2f}% {text[:60]:60s} [{top}] x{executed}")
    print()


if __name__ == "__main__":
  main()
