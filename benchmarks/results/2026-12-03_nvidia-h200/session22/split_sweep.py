"""Session 22: decode time against an explicit num_splits (0 = the heuristic), cuDNN beside it."""

import functools
import sys

sys.path.insert(0, "benchmarks")
import decode as D  # noqa: E402
from timing import time_ms  # noqa: E402


def ours(problem, splits, iterations=10):
  q, k, v, lengths, (k_new, v_new), table = problem.inputs()

  def calls(n):
    run = functools.partial(D.attend_threaded, calls=n, num_splits=splits)
    return time_ms(run, q, k, v, lengths, k_new, v_new, table, iterations=iterations)

  few, many = (calls(n) for n in D.STEPS)
  return (many - few) / (D.STEPS[1] - D.STEPS[0])


CASES = [
  (1, 16384, 128, [0, 16, 32]),
  (1, 32768, 128, [0, 16, 32]),
  (1, 65536, 128, [0, 16, 32]),
  (1, 32768, 64, [0, 16, 32]),
  (2, 32768, 128, [0, 8, 16]),
  (2, 8192, 128, [0, 8, 16]),
  (8, 8192, 128, [0, 2, 4]),
  (8, 32768, 128, [0, 2, 4]),
  (8, 131072, 128, [0, 2, 4]),
  (4, 32768, 128, [0, 4, 8]),
]
for b, s, d, counts in CASES:
  p = D.Decode(b, s, 32, 8, d, 0)
  c = D.baseline_ms("cudnn", p, 10)
  print(f"b{b} s{s} d{d} cudnn {c * 1000:7.2f} us {p.kv_bytes() / c / 1e6:6.0f} GB/s", flush=True)
  for rep in range(2):
    for splits in counts:
      t = ours(p, splits)
      print(
        f"b{b} s{s} d{d} splits {splits:3d} {t * 1000:7.2f} us {p.kv_bytes() / t / 1e6:6.0f} GB/s",
        flush=True,
      )
