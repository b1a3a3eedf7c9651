// Types of one backward kernel. The consumer warpgroups compute S^T = K·Q^T and
// dP^T = V·dO^T, so each thread holds the same (key, query) elements of both. Split by
// keys (see bwd/config.h), P^T and dS^T feed dV += P^T·dO and dK += dS^T·Q straight from
// registers and dS goes through shared memory once, for dQ = dS·K; split by head dim,
// P^T and dS^T both go through shared memory and every GEMM after them reads it.
#pragma once

#include <cstddef>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "bwd/config.h"
#include "bwd/query_blocks.h"
#include "common/barriers.h"
#include "common/layouts.h"

namespace jax_fa3 {

using namespace cute;

// kHasSegments: the mask comes row by row (packed sequences, common/segments.h), and the
// query tiles each key block visits from a plan. kSoftcap: see SoftcapMode.
template <class Element_, int kHeadDim_, bool kHasSegments_ = false, SoftcapMode kSoftcap_ = SoftcapMode::kRuntime>
struct BwdTraits {
  using Element = Element_;
  using Config = BwdTileConfig<kHeadDim_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kHasSegments = kHasSegments_;
  static constexpr SoftcapMode kSoftcap = kSoftcap_;
  static constexpr int kBlockM = Config::kBlockM;
  static constexpr int kBlockN = Config::kBlockN;
  using Blocks = std::conditional_t<kHasSegments, PlannedQueryBlocks<kBlockM, kBlockN>, QueryBlocks<kBlockM, kBlockN>>;
  static constexpr int kStages = Config::kStages;

  static constexpr bool kSplitHeadDim = Config::kSplitHeadDim;
  static constexpr bool kDQAtomics = Config::kDQAtomics;
  static constexpr bool kPersistent = Config::kPersistent;
  static constexpr int kConsumerWarpgroups = Config::kConsumerWarpgroups;
  static_assert(kSplitHeadDim ? kBlockN == 64 : kBlockN == 64 * kConsumerWarpgroups);
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  // A dQ writer warp and the consumer warpgroup it serves (barriers kDQFull, kDQEmpty).
  static constexpr int kDQWriterBarrierThreads = 32 + 128;
  static constexpr int kThreads = 128 + kConsumerThreads;  // + the producer warpgroup
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;

  // How the warpgroups tile an (M, N) product: along M, or along N.
  using AlongM = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  using AlongN = Layout<Shape<_1, Int<kConsumerWarpgroups>, _1>>;
  // S^T = K·Q^T and dP^T = V·dO^T: (keys, queries) over the head dim; split by keys, or
  // by queries when there are only 64 keys.
  static constexpr int kSdPWarpgroupsN = kSplitHeadDim ? kConsumerWarpgroups : 1;
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockN>, Int<kBlockM / kSdPWarpgroupsN>, Int<kHeadDim>>>(),
      conditional_t<kSplitHeadDim, AlongN, AlongM>{}));
  // dK += dS^T·Q and dV += P^T·dO: (keys, head dim) over the queries. Split by keys: A
  // from registers. Split by head dim: A (P^T, dS^T: K-major views of the shared buffers).
  using TiledMmaKV = conditional_t<
      kSplitHeadDim,
      decltype(make_tiled_mma(
          GMMA::ss_op_selector<Element, Element, float,
                               Shape<Int<kBlockN>, Int<kHeadDim / kConsumerWarpgroups>, Int<kBlockM>>,
                               GMMA::Major::K, GMMA::Major::MN>(),
          AlongN{})),
      decltype(make_tiled_mma(
          GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>,
                               GMMA::Major::K, GMMA::Major::MN>(),
          AlongM{}))>;
  // dQ = dS·K: (queries, head dim) over the keys; the warpgroups split the queries when
  // there are 64 per warpgroup, else the head dim.
  static constexpr bool kDQSplitsQueries = kBlockM == 64 * kConsumerWarpgroups;
  static constexpr int kDQWarpgroupsM = kDQSplitsQueries ? kConsumerWarpgroups : 1;
  static constexpr int kDQWarpgroupsN = kDQSplitsQueries ? 1 : kConsumerWarpgroups;
  static_assert((kHeadDim / kDQWarpgroupsN) % 64 == 0, "dQ's head-dim split must keep whole swizzle atoms");
  using TiledMmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<Int<kBlockM / kDQWarpgroupsM>, Int<kHeadDim / kDQWarpgroupsN>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<Int<kDQWarpgroupsM>, Int<kDQWarpgroupsN>, _1>>{}));

  // Q and dO: (queries, head dim, stage), head dim contiguous; their transposes are views.
  using SmemLayoutQ = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockM, kHeadDim>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>{})));
  // K and V: (keys, head dim); K's transpose is dQ's B operand.
  using SmemLayoutK = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockN, kHeadDim>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));
  // dS (and P, split by head dim): (queries, keys, buffer), queries contiguous (MN-major A
  // of dQ = dS·K; its transpose is the K-major A of dK += dS^T·Q), so the (key,
  // query-pair) fragments of dS^T store as 32-bit words. Double-buffered: one warpgroup
  // may write step m+1 while the other still reads step m.
  using SmemLayoutDS = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::MN, Element, kBlockM, kBlockN>(),
                                              Shape<Int<kBlockM>, Int<kBlockN>, _2>{}, Step<_2, _1, _3>{}));
  using SmemLayoutDSt = decltype(composition(
      SmemLayoutDS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>, _2>{},
                                  Stride<Int<kBlockM>, _1, Int<kBlockM * kBlockN>>{})));

  // dQ of one step in float32, in the accumulators' own order (see dq_index), so
  // stores are conflict-free and one bulk reduce-add sends it to global memory.
  static constexpr int kDQValuesPerThread = kBlockM * kHeadDim / kConsumerThreads;
  static constexpr int kDQFloats = kBlockM * kHeadDim;

  // A shared-memory array that only some configurations have.
  template <class T, int kSize, bool kPresent>
  struct OptionalArray {
    alignas(1024) cute::array_aligned<T, kSize> data;
  };
  template <class T, int kSize>
  struct OptionalArray<T, kSize, false> {};

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutDS>> ds;
    OptionalArray<Element, cosize_v<SmemLayoutDS>, kSplitHeadDim> p;
    OptionalArray<float, kDQFloats, !kDQAtomics> dq;
    alignas(16) float lse_log2[kStages][kBlockM];  // row statistics of the staged query tile
    alignas(16) float dpsum[kStages][kBlockM];
    typename TmaRing<kStages>::Storage qdo_ring;
    uint64_t kv_full;   // K and V of the CTA's current tile landed
    uint64_t kv_empty;  // both consumer warpgroups are done with them
    float unused_sink;  // target of finish_before_next_wait's never-executed store
  };
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  // Between tiles the dS tiles, and the P tiles laid out right after them, are free: the
  // epilogue stages dK and dV there (see BwdEpilogue).
  static constexpr size_t kStagingBytes =
      sizeof(SharedStorage::ds) + (kSplitHeadDim ? sizeof(SharedStorage::p) : 0);
  static_assert(!kSplitHeadDim || offsetof(SharedStorage, p) == offsetof(SharedStorage, ds) + sizeof(SharedStorage::ds),
                "the P tiles must follow the dS tiles");
  static_assert(kSharedBytes <= 227 * 1024, "tile config exceeds shared memory");

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesStats = kBlockM * sizeof(float);

  using ShapeSDHB = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideSDHB = Stride<int64_t, _1, int64_t, int64_t>;
  static auto null_tensor() {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeSDHB{}, StrideSDHB{});
  }
  using TmaLoadQ = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor(), take<0, 2>(SmemLayoutQ{}),
                                          Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using TmaLoadK = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor(), SmemLayoutK{},
                                          Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  struct Params {
    TmaLoadQ tma_q, tma_dout;
    TmaLoadK tma_k, tma_v;
    Element* dk;  // [batch, seqlen_k, kv_heads, head_dim] (when not GQA)
    Element* dv;
    int64_t dk_row_stride, dk_head_stride, dk_batch_stride;
    float* dk_accum;  // [batch, seqlen_k, kv_heads, head_dim] float32 (GQA)
    float* dv_accum;
    float* dq_accum;  // [batch, heads, m_blocks, kDQFloats]
    float const* dpsum;     // [batch, heads, seqlen_q_rounded]
    float const* lse_log2;  // [batch, heads, seqlen_q_rounded]; +inf for empty rows
    int* dq_semaphore;      // [batch, heads, m_blocks] (deterministic)
    int* dkv_semaphore;     // [batch, kv_heads, n_blocks] (deterministic GQA)
    int const* seqused_q;
    int const* seqused_k;
    int4 const* q_rows;            // [batch, seqlen_q] (kHasSegments)
    int4 const* kv_rows;           // [batch, seqlen_k] (kHasSegments)
    int4 const* query_tile_plan;   // [batch, num_m_blocks] (kHasSegments)
    int2 const* key_block_plan;    // [batch, num_n_blocks]: {m_begin, m_end} (kHasSegments)
    int batch, seqlen_q, seqlen_k, heads, kv_heads, kv_group, seqlen_q_rounded, num_m_blocks, num_n_blocks;
    int num_tiles;  // num_n_blocks x heads x batch (see KeyTileOrder)
    float scale_log2;        // log2 units per score unit (after the softcap, when on)
    float softcap_prescale;  // 0 = no softcap; else scores <- tanh(scores * prescale)
    float softmax_scale;     // dK's final factor (dQ's is applied by the postprocess)
    int window_left, window_right, diagonal_offset;
    bool deterministic;
    // Deterministic with a right window edge (causal): key block n's first query tile is
    // about n, so if the key blocks add into a tile from the last down, each arrives one
    // step after the one before it and none waits (FA3's shortest-first order). CTAs then
    // launch from the last key block down, so that none spins on one not yet launched.
    bool dq_descending;
  };
};

}  // namespace jax_fa3
