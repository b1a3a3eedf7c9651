// Host side of the forward pass: TMA descriptors, grid and launch for one
// (dtype, head dim) variant. Instantiated once per variant in cuda/instantiations/.
#pragma once

#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>
#include <cute/tensor.hpp>

#include "common/launch.h"
#include "common/params.h"
#include "fwd/kernel.h"
#include "fwd/tile_order.h"
#include "fwd/traits.h"

namespace jax_fa3 {

template <class Traits>
cudaError_t launch_fwd(FwdParams const& fp, cudaStream_t stream) {
  using Element = typename Traits::Element;
  using ElementOut = typename Traits::ElementOut;
  auto gmem = [](void const* ptr, auto shape, auto stride) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), shape, stride);
  };
  auto gmem_out = [](void const* ptr, auto shape, auto stride) {
    return make_tensor(make_gmem_ptr(static_cast<ElementOut const*>(ptr)), shape, stride);
  };
  auto const q = gmem(fp.q, make_shape(fp.seqlen_q, fp.head_dim, fp.heads, fp.batch),
                      make_stride(fp.q_row_stride, _1{}, fp.q_head_stride, fp.q_batch_stride));
  auto const k = gmem(fp.k, make_shape(fp.seqlen_k, fp.head_dim, fp.kv_heads, fp.batch),
                      make_stride(fp.k_row_stride, _1{}, fp.k_head_stride, fp.k_batch_stride));
  // 16-bit: V read as V^T (TMA transposes); FP8: V as it is (transposed on chip).
  auto const v = [&] {
    if constexpr (Traits::kFp8) {
      return gmem(fp.v, make_shape(fp.seqlen_k, fp.head_dim_v, fp.kv_heads, fp.batch),
                  make_stride(fp.v_row_stride, _1{}, fp.v_head_stride, fp.v_batch_stride));
    } else {
      return gmem(fp.v, make_shape(fp.head_dim_v, fp.seqlen_k, fp.kv_heads, fp.batch),
                  make_stride(_1{}, fp.v_row_stride, fp.v_head_stride, fp.v_batch_stride));
    }
  }();
  auto const o = gmem_out(fp.out, make_shape(fp.seqlen_q, fp.head_dim_v, fp.heads, fp.batch),
                      make_stride(fp.o_row_stride, _1{}, fp.o_head_stride, fp.o_batch_stride));

  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  typename Traits::Params p{};
  p.tma_q = make_tma_atom(SM90_TMA_LOAD{}, q, typename Traits::SmemLayoutQ{}, Shape<Int<kBlockM>, Int<Traits::kHeadDim>>{});
  p.tma_k = make_tma_atom(SM90_TMA_LOAD{}, k, take<0, 2>(typename Traits::SmemLayoutK{}),
                          Shape<Int<kBlockN>, Int<Traits::kHeadDim>>{});
  p.tma_v = make_tma_atom(SM90_TMA_LOAD{}, v, take<0, 2>(typename Traits::SmemLayoutVLoad{}), typename Traits::TileV{});
  p.tma_o = make_tma_atom(SM90_TMA_STORE{}, o, typename Traits::SmemLayoutO{},
                          Shape<Int<kBlockM>, Int<Traits::kHeadDimV>>{});
  p.out = static_cast<ElementOut*>(fp.out);
  p.o_row_stride = fp.o_row_stride;
  p.o_head_stride = fp.o_head_stride;
  p.o_batch_stride = fp.o_batch_stride;
  p.lse = fp.lse;
  p.seqused_q = fp.seqused_q;
  p.seqused_k = fp.seqused_k;
  p.q_rows = reinterpret_cast<int4 const*>(fp.q_rows);
  p.kv_rows = reinterpret_cast<int4 const*>(fp.kv_rows);
  p.tile_plan = reinterpret_cast<int4 const*>(fp.tile_plan);
  p.tile_counter = fp.tile_counter;
  p.sinks = fp.sinks;
  p.max_logit = fp.max_logit;
  p.descale_q = fp.descale_q;
  p.descale_k = fp.descale_k;
  p.descale_v = fp.descale_v;
  p.descale_q_blocks = fp.descale_q_blocks;
  p.descale_q_block_stride = fp.descale_q_blocks > 1 ? 1 : 0;
  p.descale_k_blocks = fp.descale_k_blocks;
  p.descale_k_block_stride = fp.descale_k_blocks > 1 ? 1 : 0;
  p.batch = fp.batch;
  p.seqlen_q = fp.seqlen_q;
  p.seqlen_k = fp.seqlen_k;
  p.heads = fp.heads;
  p.kv_heads = fp.kv_heads;
  p.kv_group = fp.heads / fp.kv_heads;
  p.num_m_blocks = (fp.seqlen_q + kBlockM - 1) / kBlockM;
  p.num_tiles = p.num_m_blocks * fp.heads * fp.batch;
  if constexpr (Traits::kHasSegments) {  // the plan holds at most this many tiles (the kernel reads how many)
    p.plan_capacity = fwd_plan_capacity(fp.batch, fp.seqlen_q, kBlockM);
    p.num_tiles = p.plan_capacity * fp.heads;
  }
  p.heads_per_l2_section = heads_per_l2_section(fp, sizeof(Element));
  float const log2e = float(M_LOG2E);
  if (fp.softcap > 0.f) {
    p.scale_log2 = fp.softcap * log2e;
    p.softcap_prescale = fp.softmax_scale / fp.softcap;
  } else {
    p.scale_log2 = fp.softmax_scale * log2e;
    p.softcap_prescale = 0.f;
  }
  p.window_left = fp.window_left;
  p.window_right = fp.window_right;
  p.diagonal_offset = fp.diagonal_offset;

  auto kernel = fwd_kernel<Traits>;
  if (cudaError_t e = set_shared_memory<fwd_kernel<Traits>>(Traits::kSharedBytes); e != cudaSuccess) { return e; }

  if constexpr (Traits::kDynamicScheduler) {
    if (cudaError_t e = cudaMemsetAsync(fp.tile_counter, 0, sizeof(int), stream); e != cudaSuccess) { return e; }
  }
  if (fp.max_logit) {  // key 0: below every score (common/max_logit.h)
    size_t const bytes = sizeof(uint32_t) * fp.batch * fp.heads;
    if (cudaError_t e = cudaMemsetAsync(fp.max_logit, 0, bytes, stream); e != cudaSuccess) { return e; }
  }
  int const grid = std::min(p.num_tiles, fp.num_sms);
  kernel<<<grid, Traits::kThreads, Traits::kSharedBytes, stream>>>(p);
  return cudaGetLastError();
}

// The variant entry point: picks the kernel for packed sequences, a mask window, or none.
template <class Element, class ElementOut, int kHeadDim>
cudaError_t run_fwd(FwdParams const& fp, cudaStream_t stream) {
  if constexpr (sizeof(Element) > 1) {  // FP8 takes no packed sequences (checked by the FFI)
    if (fp.q_rows) { return launch_fwd<FwdTraits<Element, ElementOut, kHeadDim, kHeadDim, true, true>>(fp, stream); }
  }
  using Windowed = FwdTraits<Element, ElementOut, kHeadDim, kHeadDim, true>;
  using Plain = FwdTraits<Element, ElementOut, kHeadDim, kHeadDim, false>;
  bool const has_window = fp.window_left >= 0 || fp.window_right >= 0;
  if (has_window) {
    constexpr int kShortMasked = Windowed::Config::kShortMaskedKeys;  // the tile table's column
    if constexpr (kShortMasked > 0) {
      if (fp.seqlen_k <= kShortMasked) {
        return launch_fwd<FwdTraits<Element, ElementOut, kHeadDim, kHeadDim, true, false, true>>(fp, stream);
      }
    }
    return launch_fwd<Windowed>(fp, stream);
  }
  constexpr int kShortKeys = Plain::Config::kShortKeysWindowKernel;  // the tile table's column
  if constexpr (kShortKeys > 0) {
    if (fp.seqlen_k <= kShortKeys) {
      FwdParams wide = fp;  // row i sees keys [i - seqlen_q, i + seqlen_k]: all of them
      wide.diagonal_offset = 0;
      wide.window_left = fp.seqlen_q;
      wide.window_right = fp.seqlen_k;
      return launch_fwd<Windowed>(wide, stream);
    }
  }
  return launch_fwd<Plain>(fp, stream);
}

// The forward's tile for packed sequences, (kBlockM, kBlockN): its plan is made in JAX.
template <int kHeadDim>
constexpr TileShape fwd_segment_tile() {
  using Traits = FwdTraits<cutlass::bfloat16_t, cutlass::bfloat16_t, kHeadDim, kHeadDim, true, true>;
  return {Traits::kBlockM, Traits::kBlockN};
}

// The tile of the kernel without a mask; an FP8 k descale factor covers one of its key tiles.
template <class Element, int kHeadDim>
constexpr TileShape fwd_tile() {
  using Traits = FwdTraits<Element, cutlass::bfloat16_t, kHeadDim, kHeadDim, false>;
  return {Traits::kBlockM, Traits::kBlockN};
}

}  // namespace jax_fa3
