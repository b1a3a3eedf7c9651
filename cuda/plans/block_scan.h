// Scans over a row longer than the CTA, a CTA-wide chunk at a time: the plans' cummax,
// cummin and compactions (segments.py's lax.cummax / cumsum). Every thread of the CTA must
// call these (they hold __syncthreads).
#pragma once

namespace jax_fa3::plans {

constexpr int kPlanThreads = 1024;
constexpr int kPlanWarps = kPlanThreads / 32;

struct Sum {
  __device__ int operator()(int a, int b) const { return a + b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};
struct Min {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

// The inclusive scan of one value per thread, in thread order; `*total` gets the last
// one's. `warp_totals` is 32 ints of shared memory.
template <class Op>
__device__ int cta_inclusive_scan(int value, Op op, int* warp_totals, int* total) {
  int const lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    int const other = __shfl_up_sync(0xffffffffu, value, d);
    if (lane >= d) { value = op(other, value); }
  }
  if (lane == 31) { warp_totals[warp] = value; }
  __syncthreads();
  if (warp == 0) {
    int t = warp_totals[lane];
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      int const other = __shfl_up_sync(0xffffffffu, t, d);
      if (lane >= d) { t = op(other, t); }
    }
    warp_totals[lane] = t;
  }
  __syncthreads();
  if (warp > 0) { value = op(warp_totals[warp - 1], value); }
  *total = warp_totals[kPlanWarps - 1];
  __syncthreads();  // warp_totals is free again
  return value;
}

// store(i, scan_i) for the inclusive scan of load(i) over [0, n) (or over (n, 0] when
// `reverse`, i.e. scan_i combines load(i..n-1)). `identity` is op's.
template <class Op, class Load, class Store>
__device__ void scan_row(int n, bool reverse, Op op, int identity, Load load, Store store, int* warp_totals) {
  int carry = identity;
  for (int base = 0; base < n; base += kPlanThreads) {
    int const k = base + int(threadIdx.x);
    int const i = reverse ? n - 1 - k : k;
    int total;
    int const scanned = op(carry, cta_inclusive_scan(k < n ? load(i) : identity, op, warp_totals, &total));
    if (k < n) { store(i, scanned); }
    carry = op(carry, total);
  }
}

// store(rank, i) for the positions i in [0, n) where flag(i), rank counting them in order;
// returns their count.
template <class Flag, class Store>
__device__ int compact_row(int n, Flag flag, Store store, int* warp_totals) {
  int count = 0;
  for (int base = 0; base < n; base += kPlanThreads) {
    int const i = base + int(threadIdx.x);
    int const f = i < n && flag(i) ? 1 : 0;
    int total;
    int const rank = count + cta_inclusive_scan(f, Sum{}, warp_totals, &total) - f;
    if (f) { store(rank, i); }
    count += total;
  }
  return count;
}

// The sum of one value per thread, on every thread.
__device__ inline int cta_sum(int value, int* warp_totals) {
  int total;
  cta_inclusive_scan(value, Sum{}, warp_totals, &total);
  return total;
}

}  // namespace jax_fa3::plans
