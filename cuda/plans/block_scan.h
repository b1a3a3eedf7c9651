// Scans of a row by one CTA, each thread walking its own contiguous chunk: one CTA-wide scan
// of the chunks' totals, so a row of any length costs two passes over it and two barriers,
// not a barrier per CTA-width of it (the plans' cummax, cummin and compactions, segments.py's
// lax.cummax / cumsum). Every thread of the CTA must call these.
#pragma once

namespace jax_fa3::plans {

constexpr int kPlanThreads = 1024;

struct Sum {
  __device__ int operator()(int a, int b) const { return a + b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};
struct Min {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

// Shared memory of the scans: one value per thread.
struct ScanStorage {
  int values[kPlanThreads];
};

// The exclusive scan of one value per thread, in thread order (identity for thread 0), and
// in `*total` everyone's.
template <class Op>
__device__ int cta_exclusive_scan(int value, Op op, int identity, ScanStorage& s, int* total) {
  int const lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    int const other = __shfl_up_sync(0xffffffffu, value, d);
    if (lane >= d) { value = op(other, value); }
  }
  if (lane == 31) { s.values[warp] = value; }
  __syncthreads();
  if (warp == 0) {
    int t = s.values[lane];
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      int const other = __shfl_up_sync(0xffffffffu, t, d);
      if (lane >= d) { t = op(other, t); }
    }
    s.values[lane] = t;
  }
  __syncthreads();
  int const inclusive = warp > 0 ? op(s.values[warp - 1], value) : value;
  *total = s.values[kPlanThreads / 32 - 1];
  __syncthreads();
  s.values[threadIdx.x] = inclusive;
  __syncthreads();
  int const exclusive = threadIdx.x > 0 ? s.values[threadIdx.x - 1] : identity;
  __syncthreads();  // the storage is free again
  return exclusive;
}

// This thread's chunk of [0, n): [begin, end).
struct Chunk {
  int begin, end;
  __device__ explicit Chunk(int n) {
    int const size = (n + kPlanThreads - 1) / kPlanThreads;
    begin = min(n, int(threadIdx.x) * size);
    end = min(n, begin + size);
  }
};

// store(i, op(load(0..i))) for i in [0, n), or with `reverse` store(i, op(load(i..n-1))).
template <class Op, class Load, class Store>
__device__ void scan_row(int n, bool reverse, Op op, int identity, Load load, Store store, ScanStorage& s) {
  Chunk const c(n);
  auto at = [&](int k) { return reverse ? n - 1 - k : k; };
  int sum = identity;
  for (int k = c.begin; k < c.end; ++k) { sum = op(sum, load(at(k))); }
  int total;
  int running = cta_exclusive_scan(sum, op, identity, s, &total);
  for (int k = c.begin; k < c.end; ++k) {
    running = op(running, load(at(k)));
    store(at(k), running);
  }
}

// The flags of this thread's positions [begin, end), kGroup at a time: the loads behind
// flag() are all issued before any is used (one memory round trip per group, not per flag).
// So flag(i) must load unconditionally (no && or ||), and it is called for i in range only.
constexpr int kGroup = 16;

template <class Flag, class Use>
__device__ void for_each_flag(Chunk const& c, Flag flag, Use use) {
  for (int base = c.begin; base < c.end; base += kGroup) {
    bool f[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) { f[u] = flag(min(base + u, c.end - 1)) & (base + u < c.end); }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      if (f[u]) { use(base + u); }
    }
  }
}

// store(rank, i) for the positions i in [0, n) where flag(i), rank counting them in order;
// returns their count (on every thread).
template <class Flag, class Store>
__device__ int compact_row(int n, Flag flag, Store store, ScanStorage& s) {
  Chunk const c(n);
  int count = 0;
  for_each_flag(c, flag, [&](int) { ++count; });
  int total;
  int rank = cta_exclusive_scan(count, Sum{}, 0, s, &total);
  for_each_flag(c, flag, [&](int i) { store(rank++, i); });
  return total;
}

}  // namespace jax_fa3::plans
