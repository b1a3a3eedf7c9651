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

// Element: q, k, v (16-bit or FP8 e4m3); ElementOut: the output (16-bit).
// kHasSegments: the mask comes row by row (packed sequences, common/segments.h); it takes
// the masked kernel's tiles and its dynamic scheduler, as documents differ in cost.
// kShortMasked: the masked kernel for calls with few keys (fwd/config.h, "short masked").
template <class Element_, class ElementOut_, int kHeadDim_, int kHeadDimV_, bool kHasWindow_,
          bool kHasSegments_ = false, bool kShortMasked_ = false>
struct FwdTraits {
  using Element = Element_;
  using ElementOut = ElementOut_;
  static constexpr bool kFp8 = sizeof(Element) == 1;
  using Config = FwdTileConfig<int(sizeof(Element)), kHeadDim_, kHasWindow_ || kHasSegments_, kShortMasked_>;
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
  static constexpr int kExp2OnFmaPer8 = Config::kExp2OnFmaPer8;
  // Tiles from the dynamic scheduler's counter: always with a window or packed sequences
  // (uneven tiles), and where the tile table says so.
  static constexpr bool kDynamicScheduler = kHasWindow || Config::kDynamicScheduler;
  // The consumers take the next tile before the epilogue's store, and only the storing warp
  // waits for the whole of O in shared memory (fwd/epilogue.h): for masked kernels without
  // pingpong, whose two warpgroups reach the epilogue together. Measured on the H200
  // (benchmarks/NOTES.md, session 15): d256 causal +1-5%; with pingpong (d64, d128, FP8
  // causal) even to -1.6%, and unmasked kernels 1-2% slower at 16k. d192 is unmeasured.
  static constexpr bool kEarlyTileHandoff = kHasWindow && !kPingpong;
  // The prologue's key tile runs unmasked when it is fully visible (fwd/mainloop.h): in the
  // kernels that unmasked calls run (no window, or the short-keys window kernel) and whose
  // key tile is a power of two, which common lengths are multiples of. Measured on the H200
  // (benchmarks/NOTES.md, session 16): d64 non-causal +9% at 512, +3% at 16k; d128 non-causal
  // +4.5% at 512. Elsewhere the tile is rarely fully visible, and the branch alone cost 1-2%
  // (d64 causal, d128 at 16k).
  static constexpr bool kUnmaskedPrologue = (kBlockN & (kBlockN - 1)) == 0 && !kHasSegments &&
                                            (!kHasWindow || Config::kShortKeysWindowKernel > 0);

  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 + kConsumerThreads;  // + one producer warpgroup
  // FP8: producer warps 1-3 transpose V (fwd/transpose_v.h) while warp 0 issues the loads.
  static constexpr int kTransposeThreads = kFp8 ? 96 : 0;
  // setmaxnreg budgets: the producer (and the V transpose) needs few registers, the
  // consumers hold the accumulators. 128 * (producer + consumers * count) must stay within 64K.
  static constexpr int kProducerRegisters = kConsumerWarpgroups == 2 ? 24 : 32;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 240 : 160;

  // S = Q·K^T: (kBlockM, kBlockN) over kHeadDim; O = P·V: (kBlockM, kHeadDimV) over kBlockN.
  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kBlockN>>;
  using WarpgroupLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;
  // Q and K both come from shared memory (keeping Q in registers would cost registers
  // that the larger tiles need); P comes from registers. FP8 WGMMA reads only K-major
  // operands, so its V^T is K-major (keys contiguous).
  static constexpr GMMA::Major kMajorVt = kFp8 ? GMMA::Major::K : GMMA::Major::MN;
  using TiledMmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(),
                                             WarpgroupLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K, kMajorVt>(), WarpgroupLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockM, kHeadDim>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockN, kHeadDim>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V^T (head_dim_v, kBlockN), the B operand of P·V. 16-bit: MN-major, which is what TMA
  // writes from the row-major V in global memory. FP8: K-major, written by the transposing
  // warps; its keys are permuted within each group of 16 so that P's accumulator registers
  // are already the FP8 A operand (fwd/transpose_v.h).
  using SmemLayoutVt = std::conditional_t<
      kFp8,
      decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kHeadDimV, kBlockN>(),
                             Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{})),
      decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::MN, Element, kHeadDimV, kBlockN>(),
                             Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}))>;
  // What TMA loads V into: V^T itself (16-bit), or row-major V staged for the transpose (FP8).
  using SmemLayoutVLoad = std::conditional_t<
      kFp8,
      decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, Element, kBlockN, kHeadDimV>(),
                             Shape<Int<kBlockN>, Int<kHeadDimV>, Int<kStages>>{})),
      SmemLayoutVt>;
  using SmemLayoutO = decltype(tile_to_shape(gmma_smem_atom<GMMA::Major::K, ElementOut, kBlockM, kHeadDimV>(),
                                             Shape<Int<kBlockM>, Int<kHeadDimV>>{}));

  using BufferV = cute::array_aligned<Element, cosize_v<SmemLayoutVLoad>>;
  using BufferO = cute::array_aligned<ElementOut, cosize_v<SmemLayoutO>>;
  struct SeparateVO {
    alignas(1024) BufferV v;
    alignas(1024) BufferO o;
  };
  // Where Q, K, V and O do not all fit, O reuses V's load buffers: it is written only after
  // the last P·V of a tile (FP8: after the last transpose out of them), and the producer waits
  // for it to leave before loading V again.
  union AliasedVO {
    alignas(1024) BufferV v;
    alignas(1024) BufferO o;
  };
  static constexpr int kBytesVt = kFp8 ? sizeof(Element) * cosize_v<SmemLayoutVt> : 0;
  static constexpr int kBytesQKVO = 1024 * (kFp8 ? 5 : 4) +
                                    sizeof(Element) * (cosize_v<SmemLayoutQ> + cosize_v<SmemLayoutK> +
                                                       cosize_v<SmemLayoutVLoad>) +
                                    kBytesVt + sizeof(ElementOut) * cosize_v<SmemLayoutO>;
  static constexpr bool kOAliasesV = kBytesQKVO > 226 * 1024;
  using BuffersVO = std::conditional_t<kOAliasesV, AliasedVO, SeparateVO>;

  // FP8 only: V^T written by the transposing warps, and their ring to the consumers.
  struct TransposedVStorage {
    typename TmaRing<kStages>::Storage vt_ring;  // full: one arrival per transposed stage
    uint64_t v_done;  // the producer loaded its last V and every load was transposed
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutVt>> vt;
  };
  struct NoTransposedVStorage {};

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) BuffersVO vo;
    typename TmaRing<kStages>::Storage k_ring;
    typename TmaRing<kStages>::Storage v_ring;
    uint64_t q_full;   // Q of the current tile landed
    uint64_t q_empty;  // every consumer warpgroup finished its last Q·K^T of the tile
    uint64_t o_free;   // the previous tile's output left shared memory (kOAliasesV)
    int4 next_tile;    // the dynamic scheduler's hand-off slot
    float unused_sink;  // target of finish_before_next_wait's never-executed store
    std::conditional_t<kFp8, TransposedVStorage, NoTransposedVStorage> transposed;
  };
  static_assert(!kOAliasesV || sizeof(ElementOut) * cosize_v<SmemLayoutO> <= sizeof(BufferV),
                "O must fit in V's buffers");
  static constexpr int kSharedBytes = sizeof(SharedStorage);
  static_assert(kSharedBytes <= 227 * 1024, "tile config exceeds shared memory");

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);

  // Global tensors as TMA sees them: (seqlen, head_dim, heads, batch) with a unit head-dim
  // stride; 16-bit V transposed to (head_dim_v, seqlen, heads, batch).
  using ShapeSDHB = Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideSDHB = Stride<int64_t, _1, int64_t, int64_t>;
  using StrideDSHB = Stride<_1, int64_t, int64_t, int64_t>;

  template <class Stride, class T = Element>
  static auto null_tensor() {
    return make_tensor(make_gmem_ptr(static_cast<T const*>(nullptr)), ShapeSDHB{}, Stride{});
  }
  using StrideV = std::conditional_t<kFp8, StrideSDHB, StrideDSHB>;
  using TileV = std::conditional_t<kFp8, Shape<Int<kBlockN>, Int<kHeadDimV>>, Shape<Int<kHeadDimV>, Int<kBlockN>>>;
  using TmaLoadQ = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideSDHB>(), SmemLayoutQ{},
                                          Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using TmaLoadK = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideSDHB>(), take<0, 2>(SmemLayoutK{}),
                                          Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using TmaLoadV = decltype(make_tma_atom(SM90_TMA_LOAD{}, null_tensor<StrideV>(), take<0, 2>(SmemLayoutVLoad{}),
                                          TileV{}));
  using TmaStoreO = decltype(make_tma_atom(SM90_TMA_STORE{}, null_tensor<StrideSDHB, ElementOut>(), SmemLayoutO{},
                                           Shape<Int<kBlockM>, Int<kHeadDimV>>{}));

  // Everything the kernel reads, passed by value as a __grid_constant__.
  struct Params {
    TmaLoadQ tma_q;
    TmaLoadK tma_k;
    TmaLoadV tma_v;
    TmaStoreO tma_o;
    ElementOut* out;  // for the plain stores of empty tiles
    int64_t o_row_stride, o_head_stride, o_batch_stride;
    float* lse;
    int const* seqused_q;
    int const* seqused_k;
    int4 const* q_rows;     // [batch, seqlen_q] (kHasSegments)
    int4 const* kv_rows;    // [batch, seqlen_k] (kHasSegments)
    int4 const* tile_plan;  // the planned tiles (kHasSegments, fwd/key_blocks.h)
    int* tile_counter;
    float const* sinks;   // [batch, heads] or nullptr
    uint32_t* max_logit;  // [batch, heads] or nullptr
    int batch, seqlen_q, seqlen_k, heads, kv_heads, kv_group;  // kv_group = heads / kv_heads
    int num_m_blocks, num_tiles, heads_per_l2_section;
    float scale_log2;        // log2 units per score unit (after the softcap, when on)
    float softcap_prescale;  // 0 = no softcap; else scores <- tanh(scores * prescale)
    int window_left, window_right, diagonal_offset;
    // FP8 descale factors (nullptr = 1): q [batch, heads, q blocks of 64 rows], k [batch,
    // kv_heads, key tiles], v [batch, kv_heads]; a block stride of 0 = one factor per head.
    // Last, so that the 16-bit kernels' parameter offsets (and SASS) stay as they were.
    float const* descale_q;
    float const* descale_k;
    float const* descale_v;
    int descale_q_blocks, descale_q_block_stride, descale_k_blocks, descale_k_block_stride;
    int plan_capacity;  // entries the tile plan has room for (kHasSegments)
  };
};

}  // namespace jax_fa3
