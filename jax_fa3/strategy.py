"""How a sequence split over devices runs (context parallelism): as a ring (ring.py) or by
all-gathering K/V (all_gather.py), chosen by shape, device count and mask, or as the caller
forces it (`context_parallel=`).

`plan` answers for one call; `costs` is its cost model. Both strategies do the same
attention work, balanced the same way where they can balance it; they differ in what they
expose of their communication:
- the ring makes P steps, each waiting for its K/V chunk hop (hidden when the step's
  attention takes longer than the hop) and each paying a fixed cost seen in every measured
  run (launches, the lse merge, the step's synchronization);
- all-gather waits for the whole K/V once, before it attends, in one or two calls.
So the ring pays for long sequences (large steps hide the hops and dwarf the per-step cost),
all-gather for short ones, many devices and few k/v heads (small K/V chunks).

The model's constants were measured on other runs than the ones that will tell the two
apart: RE-MEASURE THEM on the two-GPU machine (`benchmarks/scaling.py --sweeps ring
--strategies ring all_gather`, which records the model's estimate beside each time), and
move the threshold where the measurements cross.
"""

import dataclasses

from jax_fa3.primitives import AttentionParams

STRATEGIES = ("auto", "ring", "all_gather")


def check(function, context_parallel):
  """`context_parallel` as given, or a ValueError from `function` that lists the choices."""
  if not isinstance(context_parallel, str) or context_parallel not in STRATEGIES:
    raise ValueError(
      f"{function}: context_parallel must be one of {', '.join(map(repr, STRATEGIES))} "
      f"(how a sequence split over devices runs), got {context_parallel!r}"
    )
  return context_parallel


# One GPU's attention forward, FLOPs per ms: an H100 at 32k tokens, 16 heads, d128, not
# causal, 626 TFLOP/s (benchmarks/results/2026-11-25_h100-sxm-x2/scaling.md, ring sweep, 1
# device). The two strategies share this term, so it sets only the ring's hiding of hops.
FLOPS_PER_MS = 626e9
# NVLink, bytes per ms: on two H200s a 16k-token K/V chunk (134 MB) moves in ~0.3 ms (issue
# 20's measurement, by the wall clock).
LINK_BYTES_PER_MS = 450e6
# What each ring step costs beyond its attention and a hidden hop: on two H100s, forward, not
# causal, 8k tokens, the ring took 0.950 ms against 1.078 ms on one GPU, 0.41 ms more than
# half of it over 2 steps (the 2026-11-25 scaling.md above; at 32k: 7.606 against 14.050,
# 0.29 ms a step). Issue 20 reports two H200s losing ~3 ms a call at 32k, so this is low for
# them, which favours the ring: the thresholds err towards today's behaviour.
RING_STEP_MS = 0.2


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a split sequence runs, and why (`reason`, for people)."""

  strategy: str  # "ring" or "all_gather"
  striped: bool = False  # the ring's layout (ring.py)
  zigzag: bool = False  # all-gather's layout (all_gather.py)
  reason: str = ""


def plan(
  size,
  q_shape,
  k_shape,
  params: AttentionParams,
  packed=False,
  context_parallel="auto",
  packed_striped=False,
) -> Plan:
  """The strategy for q `[B, Sq, H, D]` and k `[B, Sk, Hk, D]` split over `size` devices
  along their sequences (both lengths multiples of `size`).

  The ring takes any split without a mask, and packed sequences (their rows hold the mask;
  contiguous, or striped with `packed_striped` where it applies); a mask bounded on one
  side (causal) where both lengths are multiples of size**2 (striped, balanced); any other
  mask where the lengths are equal (contiguous). All-gather takes every split: a mask
  bounded on one side runs zigzag (balanced) where 2 * size divides Sq, contiguous
  otherwise. "auto" takes all-gather for packed sequences (their mask is data, which the
  model cannot weigh; the packed ring measured 0.54-0.74x of one GPU on two H200s,
  benchmarks/NOTES.md) and where the ring cannot run, else the cheaper by `costs`.
  Forcing "ring" where it cannot run raises a ValueError.
  """
  check("jax_fa3", context_parallel)
  seqlen_q, seqlen_k = q_shape[1], k_shape[1]
  one_sided = _bounded_sides(params) == 1
  striped = one_sided and seqlen_q % size**2 == 0 and seqlen_k % size**2 == 0
  if packed:
    ring_plan = Plan("ring", striped=packed_striped and striped)
  elif _bounded_sides(params) and not striped and seqlen_q != seqlen_k:
    ring_plan = None  # a mask on contiguous chunks of unequal lengths: no ring
  else:
    ring_plan = Plan("ring", striped=striped)
  gather_plan = Plan("all_gather", zigzag=one_sided and not packed and seqlen_q % (2 * size) == 0)

  if context_parallel == "ring":
    if ring_plan is None:
      raise ValueError(
        f"context_parallel='ring' cannot run this split: with a mask that depends on "
        f"positions (window {params.window_left, params.window_right}) a ring needs equal "
        f"query and key lengths, or, for a mask bounded on one side, both lengths multiples "
        f"of P * P = {size**2} (P = {size} devices); got seqlen_q {seqlen_q}, seqlen_k "
        f"{seqlen_k}. Use context_parallel='all_gather' or 'auto'."
      )
    return dataclasses.replace(ring_plan, reason="ring: forced by context_parallel='ring'")
  if context_parallel == "all_gather":
    return dataclasses.replace(gather_plan, reason="all_gather: forced by context_parallel")
  if packed:
    return dataclasses.replace(
      gather_plan, reason="all_gather: packed sequences (the mask is in the rows, unseen here)"
    )
  if ring_plan is None:
    return dataclasses.replace(
      gather_plan,
      reason=f"all_gather: a ring cannot split a masked {seqlen_q} x {seqlen_k} sequence "
      f"over {size} devices",
    )
  ring_ms, gather_ms = costs(size, q_shape, k_shape, params, ring_plan.striped, gather_plan.zigzag)
  chosen = gather_plan if gather_ms < ring_ms else ring_plan
  return dataclasses.replace(
    chosen,
    reason=f"{chosen.strategy}: cost model (a forward on {size} devices): ring ~{ring_ms:.4g} "
    f"ms, all-gather ~{gather_ms:.4g} ms",
  )


def costs(size, q_shape, k_shape, params: AttentionParams, striped, zigzag, itemsize=2):
  """(ring ms, all-gather ms): the model's time for one forward of q `[B, Sq, H, D]` against
  k `[B, Sk, Hk, D]` (v alike) of `itemsize`-byte elements split over `size` devices, the
  ring `striped` or contiguous, all-gather `zigzag` or contiguous.

  - work: the busiest device's attention, 4 B H D per visible (query, key) pair. A mask
    bounded on one side is a triangle, of which a balanced layout gives each device 1/P
    and contiguous chunks the last device (P - 1/2) / P^2; a band is about its width per
    query, balanced; no mask, Sq Sk / P.
  - ring: P steps of max(work / P, one K/V chunk's hop) + RING_STEP_MS each; striped, plus
    restriping q, k, v and out (each device sends (P - 1) / P of them, all-to-all).
  - all-gather: work + the P - 1 K/V chunks it gathers; zigzag, plus moving the query and
    output halves (about one chunk of q).
  """
  batch, seqlen_q, heads, head_dim = q_shape
  seqlen_k, kv_heads = k_shape[1:3]
  hop_ms = batch * seqlen_k // size * kv_heads * 2 * head_dim * itemsize / LINK_BYTES_PER_MS
  q_chunk_ms = batch * seqlen_q // size * heads * head_dim * itemsize / LINK_BYTES_PER_MS

  def work_ms(balanced):
    pairs = _busiest_pairs(size, seqlen_q, seqlen_k, params, balanced)
    return 4 * batch * heads * head_dim * pairs / FLOPS_PER_MS

  ring_ms = size * (max(work_ms(striped) / size, hop_ms) + RING_STEP_MS)
  if striped:
    ring_ms += (size - 1) / size * (2 * q_chunk_ms + hop_ms)
  gather_ms = work_ms(zigzag) + (size - 1) * hop_ms + (q_chunk_ms if zigzag else 0.0)
  return ring_ms, gather_ms


def _busiest_pairs(size, seqlen_q, seqlen_k, params, balanced):
  """About how many (query, key) pairs the busiest of `size` devices attends to."""
  share = seqlen_q * seqlen_k / size
  sides = _bounded_sides(params)
  if sides == 2:
    return seqlen_q * min(seqlen_k, params.window_left + params.window_right + 1) / size
  if sides == 1:
    return share / 2 if balanced else share * (size - 0.5) / size
  return share


def _bounded_sides(params):
  return (params.window_left >= 0) + (params.window_right >= 0)
