// Synchronisation between the producer warp and the consumer warpgroups:
// hardware named barriers and a TMA stage ring built on mbarriers.
#pragma once

#include <cutlass/arch/barrier.h>

#include "common/ptx.h"

namespace jax_fa3 {

// Named barrier ids; id 0 belongs to __syncthreads.
enum class Barrier : int {
  kPingpong = 1,          // 1..3: one per consumer warpgroup, orders their WGMMA issue
  kConsumers = 4,         // every consumer thread (epilogue)
  kSchedulerFull = 5,     // producer -> consumers: the next tile index is published
  kSchedulerEmpty = 6,    // consumers -> producer: the published index was read
  kDQFull = 7,            // backward, 7..8: one per consumer warpgroup -> its dQ writer warp,
                          // the warpgroup's part of the step's dQ is in shared memory
  kDQEmpty = 9,           // backward, 9..10: dQ writer -> its warpgroup, the bulk reduce has read it
  kTransposeV = 11,       // FP8 forward: the warps transposing V finished a stage
  kOStaged = 12,          // forward epilogue: every consumer's part of O is in shared memory
};

__device__ __forceinline__ void barrier_sync(Barrier id, int num_threads, int offset = 0) {
  named_barrier_sync(static_cast<int>(id) + offset, num_threads);
}

__device__ __forceinline__ void barrier_arrive(Barrier id, int num_threads, int offset = 0) {
  named_barrier_arrive(static_cast<int>(id) + offset, num_threads);
}

// A ring of shared-memory stages filled by TMA and drained by consumer warpgroups.
// "full" completes when the producer's transaction bytes land; "empty" completes when
// every consumer warpgroup released the stage. Only one thread per warpgroup arrives
// on "empty": CUTLASS >= 3.6 makes all 128 arrive, which is measurably slower.
template <int kStages>
struct TmaRing {
  struct Storage {
    uint64_t full[kStages];
    uint64_t empty[kStages];
  };

  struct Position {
    int stage = 0;
    uint32_t phase = 0;
    __device__ void advance() {
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  };

  Storage& storage;

  static __device__ void init(Storage& s, int consumer_warpgroups) {
    for (int i = 0; i < kStages; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&s.full[i], 1);
      cutlass::arch::ClusterBarrier::init(&s.empty[i], consumer_warpgroups);
    }
  }

  // Producer: wait for the stage to be free, then announce the bytes TMA will write.
  // The first pass over the ring waits on the "previous" phase, which counts as done.
  __device__ uint64_t& acquire(Position p, uint32_t bytes) {
    cutlass::arch::ClusterBarrier::wait(&storage.empty[p.stage], p.phase ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&storage.full[p.stage], bytes);
    return storage.full[p.stage];
  }

  // A stage filled by threads rather than TMA: wait until it is free to overwrite ...
  __device__ void wait_empty(Position p) { cutlass::arch::ClusterBarrier::wait(&storage.empty[p.stage], p.phase ^ 1); }
  // ... and, once written (and fenced for the async proxy), announce it with one arrival.
  __device__ void publish(Position p) { cutlass::arch::ClusterBarrier::arrive(&storage.full[p.stage]); }

  // Waits a while (the hardware's suspend time limit) for the stage; false if it is not full yet.
  __device__ bool try_full(Position p) {
    return cutlass::arch::ClusterBarrier::try_wait(&storage.full[p.stage], p.phase);
  }

  __device__ void wait_full(Position p) {
    cutlass::arch::ClusterTransactionBarrier::wait(&storage.full[p.stage], p.phase);
  }

  // Called by one thread of each consumer warpgroup once its WGMMAs on the stage are done.
  __device__ void release(Position p) { cutlass::arch::ClusterBarrier::arrive(&storage.empty[p.stage]); }
};

}  // namespace jax_fa3
