"""Random packed documents for the packed-sequence tests, on the CPU and the GPU."""

import numpy as np


def random_documents(rng, length, mean, pad=0):
  """Segment ids [length] int32 of documents of random lengths (uniform in 1 to 2 `mean` - 1)
  packed into `length` tokens, the last one cut, the last `pad` tokens padding (-1)."""
  ids, doc = [], 0
  while len(ids) < length - pad:
    ids += [doc] * int(rng.integers(1, 2 * mean))
    doc += 1
  return np.array(ids[: length - pad] + [-1] * pad, np.int32)
