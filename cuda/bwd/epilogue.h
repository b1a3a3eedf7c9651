// Writing dK and dV from the consumer warpgroups' registers: straight to the outputs, or
// (GQA) added in float32 into the group's accumulators, in head order when deterministic.
#pragma once

#include <cute/tensor.hpp>

#include "common/barriers.h"
#include "bwd/producer.h"

namespace jax_fa3 {

using namespace cute;

template <class Traits>
struct BwdEpilogue {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;

  Params const& p;
  int const thread_idx;  // among the consumer threads

  template <class AccDK, class AccDV>
  __device__ void store(int n_block, int head, int batch, AccDK& acc_dk, AccDV& acc_dv) {
    typename Traits::TiledMmaKV mma_kv;
    Tensor coords = mma_kv.get_thread_slice(thread_idx).partition_C(
        make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= p.softmax_scale; }

    int const kv_head = head / p.kv_group;
    int64_t const base = batch * p.dk_batch_stride + kv_head * p.dk_head_stride;
    auto for_each_value = [&](auto&& f) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc_dk); i += 2) {  // pairs of adjacent columns
        int const key = n_block * kBlockN + get<0>(coords(i));
        if (key < p.seqlen_k) { f(i, base + key * p.dk_row_stride + get<1>(coords(i))); }
      }
    };
    if (p.kv_group == 1) {
      for_each_value([&](int i, int64_t offset) {
        store_pair(&p.dk[offset], acc_dk(i), acc_dk(i + 1));
        store_pair(&p.dv[offset], acc_dv(i), acc_dv(i + 1));
      });
      return;
    }
    // GQA: sum over the query heads of the group.
    int* const semaphore = p.dkv_semaphore + (int64_t(batch) * p.kv_heads + kv_head) * p.num_n_blocks + n_block;
    consumers_add_in_turn<Traits::kConsumerThreads>(p.deterministic, semaphore, head % p.kv_group, thread_idx, [&] {
      for_each_value([&](int i, int64_t offset) {
        atomicAdd(&p.dk_accum[offset], acc_dk(i));
        atomicAdd(&p.dk_accum[offset + 1], acc_dk(i + 1));
        atomicAdd(&p.dv_accum[offset], acc_dv(i));
        atomicAdd(&p.dv_accum[offset + 1], acc_dv(i + 1));
      });
    });
  }

  // Two adjacent output elements in one 4-byte store (the column is even).
  __device__ static void store_pair(Element* destination, float a, float b) {
    struct alignas(4) Pair {
      Element x, y;
    };
    *reinterpret_cast<Pair*>(destination) = Pair{Element(a), Element(b)};
  }
};

}  // namespace jax_fa3
