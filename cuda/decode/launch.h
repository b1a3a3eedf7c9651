// Host side of decode: the split kernel, then (with more than one split) the combine, on
// one stream. Instantiated once per (dtype, head dim) in cuda/instantiations/decode_*.cu.
#pragma once

#include <algorithm>

#include <cuda_runtime.h>

#include "common/launch.h"
#include "decode/combine.h"
#include "decode/config.h"
#include "decode/kernel.h"
#include "decode/params.h"

namespace jax_fa3 {

template <class Cfg, bool kPaged>
cudaError_t launch_decode(DecodeParams const& p, cudaStream_t stream) {
  constexpr auto kernel = decode::decode_kernel<Cfg, kPaged>;
  if (cudaError_t e = set_shared_memory<kernel>(Cfg::kSmemBytes); e != cudaSuccess) { return e; }
  // The handler keeps batch * kv_heads * num_m_blocks below 2^31 (decode_tile).
  unsigned const tiles = unsigned(p.batch * p.kv_heads * p.num_m_blocks);
  dim3 const grid(tiles, p.num_splits);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) { return e; }
  if (p.num_splits > 1) {
    dim3 const rows(tiles, unsigned(std::min(kDecodeRows, p.heads / p.kv_heads * p.seqlen_q)));
    decode::combine_kernel<typename Cfg::Element><<<rows, decode::kCombineThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class Element, int kHeadDim>
cudaError_t run_decode(DecodeParams const& p, cudaStream_t stream) {
  using Cfg = decode::Config<Element, kHeadDim>;
  return p.page_table ? launch_decode<Cfg, true>(p, stream) : launch_decode<Cfg, false>(p, stream);
}

// What the split-count heuristic (jax_fa3/kvcache.py) needs to know of a variant.
template <class Element, int kHeadDim>
constexpr DecodeShape decode_shape() {
  using Cfg = decode::Config<Element, kHeadDim>;
  return {Cfg::kBlockN, Cfg::kCtasPerSm};
}

}  // namespace jax_fa3
