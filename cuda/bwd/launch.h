// Host side of the backward pass for one (dtype, head dim): carve the workspace, zero
// its accumulators, then preprocess -> main kernel -> dQ conversion (-> dK/dV conversion
// for GQA), all on XLA's stream.
#pragma once

#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>
#include <cute/tensor.hpp>

#include "bwd/kernel.h"
#include "bwd/postprocess.h"
#include "bwd/preprocess.h"
#include "bwd/traits.h"
#include "bwd/workspace.h"
#include "common/bwd_params.h"
#include "common/params.h"
#include "common/launch.h"

namespace jax_fa3 {

template <class Traits>
BwdWorkspace bwd_workspace(BwdParams const& b, void* base) {
  return BwdWorkspace::carve(base, b.batch, b.heads, b.kv_heads, b.seqlen_q, b.seqlen_k, b.head_dim, b.head_dim_v,
                             Traits::kBlockM, Traits::kBlockN, b.deterministic,
                             b.sinks ? preprocess_blocks<Traits::kHeadDim>(b.seqlen_q) : 0);
}

template <class Element, int kHeadDim>
int64_t bwd_workspace_bytes(BwdParams const& b) {
  return bwd_workspace<BwdTraits<Element, kHeadDim>>(b, nullptr).bytes;
}

template <class Traits>
cudaError_t launch_bwd(BwdParams const& b, cudaStream_t stream) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  BwdWorkspace const w = bwd_workspace<Traits>(b, b.workspace);
  if (w.bytes > b.workspace_bytes) { return cudaErrorInvalidValue; }  // the handler checks first
  int const num_m_blocks = (b.seqlen_q + kBlockM - 1) / kBlockM;
  int const num_n_blocks = (b.seqlen_k + kBlockN - 1) / kBlockN;
  int const seqlen_q_rounded = num_m_blocks * kBlockM;
  bool const gqa = b.heads != b.kv_heads;

  if (cudaError_t e = cudaMemsetAsync(b.workspace, 0, w.zeroed_bytes, stream); e != cudaSuccess) { return e; }

  BwdPreprocessParams pre{b.dout, b.out, b.lse, w.dpsum, w.lse_log2, b.sinks, w.sink_partials, b.seqused_q,
                          b.o_row_stride, b.o_head_stride, b.o_batch_stride, b.seqlen_q, seqlen_q_rounded, b.heads,
                          b.batch};
  using Pre = PreprocessShape<kHeadDim>;
  int const pre_blocks = int(preprocess_blocks<kHeadDim>(b.seqlen_q));
  static_assert(kBlockM == BwdTileConfig<kHeadDim>::kBlockM);
  bwd_preprocess_kernel<Element, kHeadDim>
      <<<dim3(pre_blocks, std::min(b.heads, kMaxGridY), std::min(b.batch, kMaxGridZ)), Pre::kThreads, 0, stream>>>(
          pre);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }
  if (b.sinks) {
    bwd_sink_grad_kernel<<<b.batch * b.heads, 128, 0, stream>>>(w.sink_partials, pre_blocks, b.dsinks);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }
  }

  auto gmem = [](void const* ptr, int seqlen, int heads, int64_t row, int64_t head, int64_t batch, int count) {
    auto const shape = make_shape(seqlen, int(Traits::kHeadDim), heads, count);
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), shape,
                       make_stride(row, _1{}, head, batch));
  };
  auto const q = gmem(b.q, b.seqlen_q, b.heads, b.q_row_stride, b.q_head_stride, b.q_batch_stride, b.batch);
  auto const dout = gmem(b.dout, b.seqlen_q, b.heads, b.o_row_stride, b.o_head_stride, b.o_batch_stride, b.batch);
  auto const k = gmem(b.k, b.seqlen_k, b.kv_heads, b.k_row_stride, b.k_head_stride, b.k_batch_stride, b.batch);
  auto const v = gmem(b.v, b.seqlen_k, b.kv_heads, b.v_row_stride, b.v_head_stride, b.v_batch_stride, b.batch);
  typename Traits::Params p{};
  auto const q_tile = Shape<Int<kBlockM>, Int<kHeadDim>>{};
  auto const k_tile = Shape<Int<kBlockN>, Int<kHeadDim>>{};
  p.tma_q = make_tma_atom(SM90_TMA_LOAD{}, q, take<0, 2>(typename Traits::SmemLayoutQ{}), q_tile);
  p.tma_dout = make_tma_atom(SM90_TMA_LOAD{}, dout, take<0, 2>(typename Traits::SmemLayoutQ{}), q_tile);
  p.tma_k = make_tma_atom(SM90_TMA_LOAD{}, k, typename Traits::SmemLayoutK{}, k_tile);
  p.tma_v = make_tma_atom(SM90_TMA_LOAD{}, v, typename Traits::SmemLayoutK{}, k_tile);
  p.dk = static_cast<Element*>(b.dk);
  p.dv = static_cast<Element*>(b.dv);
  p.dk_row_stride = b.k_row_stride;
  p.dk_head_stride = b.k_head_stride;
  p.dk_batch_stride = b.k_batch_stride;
  p.dk_accum = w.dk_accum;
  p.dv_accum = w.dv_accum;
  p.dq_accum = w.dq_accum;
  p.dpsum = w.dpsum;
  p.lse_log2 = w.lse_log2;
  p.dq_semaphore = w.dq_semaphore;
  p.dkv_semaphore = w.dkv_semaphore;
  p.seqused_q = b.seqused_q;
  p.seqused_k = b.seqused_k;
  p.q_rows = reinterpret_cast<int4 const*>(b.q_rows);
  p.kv_rows = reinterpret_cast<int4 const*>(b.kv_rows);
  p.query_tile_plan = reinterpret_cast<int4 const*>(b.query_tile_plan);
  p.key_block_plan = reinterpret_cast<int2 const*>(b.key_block_plan);
  p.batch = b.batch;
  p.seqlen_q = b.seqlen_q;
  p.seqlen_k = b.seqlen_k;
  p.heads = b.heads;
  p.kv_heads = b.kv_heads;
  p.kv_group = b.heads / b.kv_heads;
  p.seqlen_q_rounded = seqlen_q_rounded;
  p.num_m_blocks = num_m_blocks;
  p.num_n_blocks = num_n_blocks;
  p.num_tiles = num_n_blocks * b.heads * b.batch;
  float const log2e = float(M_LOG2E);
  p.scale_log2 = b.softcap > 0.f ? b.softcap * log2e : b.softmax_scale * log2e;
  p.softcap_prescale = b.softcap > 0.f ? b.softmax_scale / b.softcap : 0.f;
  p.softmax_scale = b.softmax_scale;
  p.window_left = b.window_left;
  p.window_right = b.window_right;
  p.diagonal_offset = b.diagonal_offset;
  p.deterministic = b.deterministic;
  p.dq_descending = b.deterministic && b.window_right >= 0;

  auto kernel = bwd_kernel<Traits>;
  if (cudaError_t e = set_shared_memory<bwd_kernel<Traits>>(Traits::kSharedBytes); e != cudaSuccess) { return e; }
  // Persistent CTAs pay off where tiles cost the same. Under a mask they differ, and
  // statically assigned CTAs drift apart over many heads, whose Q, dO and dQ then no longer
  // share L2 (measured at d128 causal 16k: 322 TFLOP/s against 536 with one CTA per tile);
  // deterministic runs wait on each other's dQ turns, and measured slower persistent too.
  bool const uniform_tiles =
      b.window_left < 0 && b.window_right < 0 && !b.seqused_q && !b.seqused_k && !Traits::kHasSegments;
  bool const persistent = Traits::kPersistent && uniform_tiles && !b.deterministic;
  kernel<<<persistent ? std::min(p.num_tiles, b.num_sms) : p.num_tiles, Traits::kThreads, Traits::kSharedBytes,
           stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }

  BwdPostprocessParams<Traits> post{w.dq_accum, static_cast<Element*>(b.dq), b.q_row_stride, b.q_head_stride,
                                    b.q_batch_stride, b.softmax_scale, b.seqlen_q, b.heads, num_m_blocks, b.batch};
  bwd_convert_dq_kernel<Traits>
      <<<dim3(num_m_blocks, std::min(b.heads, kMaxGridY), std::min(b.batch, kMaxGridZ)), Traits::kConsumerThreads, 0,
         stream>>>(post);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }

  if (gqa) {
    int64_t const count = int64_t(b.batch) * b.seqlen_k * b.kv_heads * kHeadDim;
    int const blocks = int(std::min<int64_t>((count + 255) / 256, 8 * b.num_sms));
    bwd_convert_kv_kernel<Element><<<blocks, 256, 0, stream>>>(w.dk_accum, static_cast<Element*>(b.dk), count, 1.f);
    bwd_convert_kv_kernel<Element><<<blocks, 256, 0, stream>>>(w.dv_accum, static_cast<Element*>(b.dv), count, 1.f);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }
  }
  return cudaSuccess;
}

// The kernel compiled with the softcap, or the one without it.
template <class Element, int kHeadDim, bool kHasSegments>
cudaError_t launch_bwd_by_softcap(BwdParams const& b, cudaStream_t stream) {
  return b.softcap > 0.f ? launch_bwd<BwdTraits<Element, kHeadDim, kHasSegments, SoftcapMode::kOn>>(b, stream)
                         : launch_bwd<BwdTraits<Element, kHeadDim, kHasSegments, SoftcapMode::kOff>>(b, stream);
}

// The variant entry point: the kernels for packed sequences, or those for everything else.
template <class Element, int kHeadDim>
cudaError_t run_bwd(BwdParams const& b, cudaStream_t stream) {
  if (!b.q_rows) { return launch_bwd_by_softcap<Element, kHeadDim, false>(b, stream); }
  if constexpr (BwdTileConfig<kHeadDim>::kPackedSoftcapCompiled) {
    return launch_bwd_by_softcap<Element, kHeadDim, true>(b, stream);
  } else {
    return launch_bwd<BwdTraits<Element, kHeadDim, true, SoftcapMode::kRuntime>>(b, stream);
  }
}

// The backward's tile for packed sequences, (kBlockM, kBlockN): its plans are made in JAX.
template <int kHeadDim>
constexpr TileShape bwd_segment_tile() {
  return {BwdTileConfig<kHeadDim>::kBlockM, BwdTileConfig<kHeadDim>::kBlockN};
}

}  // namespace jax_fa3
