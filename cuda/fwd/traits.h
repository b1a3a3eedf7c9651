// Types of one forward kernel: tile shapes, WGMMA atoms, shared-memory layouts and
// storage, TMA descriptors, and the kernel's parameter block.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

#include "common/barriers.h"
#include "common/layouts.h"
#include "fwd/config.h"

namespace jax_fa3 {

using namespace cute;

// kHasSegments: the mask comes row by row (packed sequences, common/segments.h); it takes
// the masked kernel's tiles and its dynamic scheduler, as documents differ in cost.
template <class Element_, int kHeadDim_, int kHeadDimV_, bool kHasWindow_, bool kHasSegments_ = false>
struct FwdTraits {
  using Element = Element_;
  using Config = FwdTileConfig<kHeadDim_, kHasWindow_ || kHasSegments_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr bool kHasSegments = kHasSegments_;
  static constexpr bool kHasWindow = kHasWindow_ || kHasSegments_;
  static constexpr int kBlockM = Config::kBlockM;
  static constexpr int kBlockN = Config::kBlockN;
  static constexpr int kStages = Config::kStages;
  static constexpr bool kPingpong = Config::kPingpong;
  static constexpr bool kIntraWarpgroupOverlap = Config::kIntraWarpgroupOverlap;
  static constexpr bool kRescaleOBeforeGemm = Config::kRescaleOBeforeGemm;

  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 + kConsumerThreads;  // + one producer warpgroup
  // setmaxnreg budgets: the producer needs few registers, the consumers hold the
  // accumulators. 128 * (producer + consumers * count) must stay within 64K.
  static constexpr int kProducerRegisters = kConsumerWarpgroups == 2 ? 24 : 32;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 240 : 160;

  // S = Q·K^T: (kBlockM, kBlockN) over kHeadDim; O = P·V: (kBlockM, kHeadDimV) over kBlockN.
  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kBlockN>>;
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  // Q and K both come from shared memory (keeping Q in registers would cost registers
  // that the larger tiles need); P comes from registers.
  using TiledMmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(),
                                             WarpgroupLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, GMMA::Major::MN>(),
      WarpgroupLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockM, kHeadDim>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockN, kHeadDim>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V is stored as V^T (head_dim_v, kBlockN): the MN-major B operand of P·V, so the row-major
  // V in global memory needs no transpose.
  using SmemLayoutVt = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::MN, Element, kHeadDimV, kBlockN>(),
                                              Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{},
                                              Step<_2, _1, _3>{}));
  using SmemLayoutO = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockM, kHeadDimV>(),
                                             Shape<Int<kBlockM>, Int<kHeadDimV>>{}));

  using BufferV = cute::array_aligned<Element, cosize_v<SmemLayoutVt>>;
  using BufferO = cute::array_aligned<Element, cosize_v<SmemLayoutO>>;
  struct SeparateVO {
    alignas(1024) BufferV v;
    alignas(1024) BufferO o;
  };
  // Where Q, K, V and O do not all fit, O reuses V's buffers: it is written only after
  // the last P·V of a tile, and the producer waits for it to leave before loading V again.
  union AliasedVO {
    alignas(1024) BufferV v;
    alignas(1024) BufferO o;
  };
  static constexpr int kBytesQKVO = 1024 * 4 + sizeof(Element) * (cosize_v<SmemLayoutQ> + cosize_v<SmemLayoutK> +
                                                                  cosize_v<SmemLayoutVt> + cosize_v<SmemLayoutO>);
  static constexpr bool kOAliasesV = kBytesQKVO > 226 * 1024;
  using BuffersVO = std::conditional_t<kOAliasesV, AliasedVO, SeparateVO>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) BuffersVO vo;
    typename TmaRing<kStages>::Storage k_ring;
    typename TmaRing<kStages>::Storage v_ring;
    uint64_t q_full;   // Q of the current tile landed
    uint64_t q_empty;  // every consumer warpgroup finished its last Q·K^T of the tile
    uint64_t o_free;   // the previous tile's output left shared memory (kOAliasesV)
    int next_tile;     // the dynamic scheduler's hand-off slot
    float unused_sink;  // target of finish_before_next_wait's never-executed store
  };
  static_assert(cosize_v<SmemLayoutO> <= cosize_v<SmemLayoutVt>, "O must fit in V's buffers");
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "tile config exceeds shared memory");

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);

  // Global tensors as TMA sees them: (seqlen, head_dim, heads, batch) with a unit head-dim
  // stride; V transposed to (head_dim_v, seqlen, heads, batch).
  using ShapeSDHB = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideSDHB = Stride<int64_t, _1, int64_t, int64_t>;
  using StrideDSHB = Stride<_1, int64_t, int64_t, int64_t>;

  template <class Stride>
  static auto null_tensor() {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeSDHB{}, Stride{});
  }
  using TmaLoadQ = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideSDHB>(), SmemLayoutQ{},
                                          Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using TmaLoadK = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideSDHB>(), take<0, 2>(SmemLayoutK{}),
                                          Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using TmaLoadV = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideDSHB>(), take<0, 2>(SmemLayoutVt{}),
                                          Shape<Int<kHeadDimV>, Int<kBlockN>>{}));
  using TmaStoreO = decltype(make_tma_atom(SM90_TMA_STORE{}, null_tensor<StrideSDHB>(), SmemLayoutO{},
                                           Shape<Int<kBlockM>, Int<kHeadDimV>>{}));

  // Everything the kernel reads, passed by value as a __grid_constant__.
  struct Params {
    TmaLoadQ tma_q;
    TmaLoadK tma_k;
    TmaLoadV tma_v;
    TmaStoreO tma_o;
    Element* out;  // for the plain stores of empty tiles
    int64_t o_row_stride, o_head_stride, o_batch_stride;
    float* lse;
    int const* seqused_q;
    int const* seqused_k;
    int4 const* q_rows;     // [batch, seqlen_q] (kHasSegments)
    int4 const* kv_rows;    // [batch, seqlen_k] (kHasSegments)
    int4 const* tile_plan;  // [batch, num_m_blocks]: a KeyBlockRange each (kHasSegments)
    int* tile_counter;
    float const* sinks;   // [batch, heads] or nullptr
    uint32_t* max_logit;  // [batch, heads] or nullptr
    int batch, seqlen_q, seqlen_k, heads, kv_heads, kv_group;  // kv_group = heads / kv_heads
    int num_m_blocks, num_tiles, heads_per_l2_section;
    float scale_log2;        // log2 units per score unit (after the softcap, when on)
    float softcap_prescale;  // 0 = no softcap; else scores <- tanh(scores * prescale)
    int window_left, window_right, diagonal_offset;
  };
};

}  // namespace jax_fa3
