// The FP8 quantizer kernel: x (bf16/f16/f32) -> x' = WHT(x * signs) / sqrt(d) (or x' = x)
// -> one scale per block of rows -> e4m3. A CTA holds its rows in registers, 32 values per
// thread, from the load to the store (params.h: QuantizeGeometry says which rows).
#pragma once

#include <cstdint>

#include "quantize/params.h"
#include "quantize/row_ops.h"

namespace jax_fa3::quantize {

// kWhole: the block is one chunk: amax and write in one pass over x.
// kChunkAmax, kWrite: a longer block: each chunk's amax to the workspace, then a second pass
// reduces the block's chunk amaxes and writes (re-reading its chunk of x, mostly from L2).
enum class Pass { kWhole, kChunkAmax, kWrite };

// The largest value over the CTA, in every thread; NaN anywhere gives NaN. Called once or
// twice per CTA, every thread.
__device__ __forceinline__ float cta_max(float x, float* scratch) {
  x = warp_max(x);
  if (threadIdx.x % 32 == 0) { scratch[threadIdx.x / 32] = x; }
  __syncthreads();
  float result = 0.f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) { result = max_keeping_nan(result, scratch[w]); }
  __syncthreads();  // before the scratch is written again
  return result;
}

// x8 = e4m3(x' * (448 / amax)), descale = amax * float32(1 / 448) (a product, not a quotient:
// XLA turns a division by a constant into that product anyway, and the reference must match
// bit for bit); a block with amax 0 gets descale 1.
// Where 448 / amax would overflow (amax < 2^-64), x' and amax are first multiplied by 2^64,
// which is exact, so x8 is still x' * 448 / amax rounded once.
struct BlockScale {
  float pre, scale, descale;

  __device__ __forceinline__ explicit BlockScale(float amax) {
    pre = amax < 0x1p-64f ? 0x1p64f : 1.f;
    scale = amax == 0.f ? 1.f : 448.f / (amax * pre);
    descale = amax == 0.f ? 1.f : amax * static_cast<float>(1.0 / 448.0);
  }
};

template <class T, int kHeadDim>
__global__ void __launch_bounds__(kQuantizeMaxThreads) fp8_quantize_kernel(QuantizeParams const p, Pass const pass) {
  using L = RowLayout<kHeadDim>;
  __shared__ float scratch[kQuantizeMaxThreads / 32];
  int const lane_in_row = threadIdx.x % L::kLanesPerRow;
  int const row_in_chunk = threadIdx.x / L::kLanesPerRow;

  uint32_t negate = 0;  // bit k: value k's element has a negative sign
  if (p.signs) {
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) {
      negate |= (__float_as_uint(__ldg(p.signs + L::element(k, lane_in_row))) >> 31) << k;
    }
  }

  // One CTA per chunk: blockIdx.x = (b * heads + h) * chunks_per_head + chunk.
  QuantizeGeometry const& g = p.geometry;
  int64_t const chunks_per_head = g.num_blocks * g.chunks_per_block;
  int64_t const head_index = blockIdx.x / chunks_per_head;  // b * heads + h
  int64_t const chunk = blockIdx.x % chunks_per_head;
  int64_t const block = chunk / g.chunks_per_block, part = chunk % g.chunks_per_block;
  int64_t const block_begin = block * g.block_rows;
  int64_t const chunk_begin = block_begin + part * g.chunk_rows;
  int64_t const chunk_end = min(min(chunk_begin + g.chunk_rows, block_begin + g.block_rows), p.seqlen);
  int64_t const row = chunk_begin + row_in_chunk;
  bool const valid = row < chunk_end;
  int64_t const b = head_index / p.heads, h = head_index % p.heads;
  int64_t const offset = ((b * p.seqlen + row) * p.heads + h) * kHeadDim + lane_in_row * L::kRun;

  Run<T> runs[L::kRuns];
#pragma unroll
  for (int r = 0; r < L::kRuns; ++r) { runs[r].load(static_cast<T const*>(p.x) + offset + r * L::kRunStride, valid); }

  float amax = 0.f;
  if (pass == Pass::kWrite) {  // the block's chunk amaxes, read while x is in flight
    float const* chunk_amax = p.partial_amax + head_index * chunks_per_head + block * g.chunks_per_block;
    for (int i = threadIdx.x; i < g.chunks_per_block; i += blockDim.x) { amax = max_keeping_nan(amax, chunk_amax[i]); }
    amax = cta_max(amax, scratch);
  }

  float v[L::kValues];
#pragma unroll
  for (int r = 0; r < L::kRuns; ++r) { runs[r].to_floats(v + r * L::kRun); }
  if (p.signs) {
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { v[k] = flip_sign(v[k], (negate >> k) & 1u); }
    walsh_hadamard<kHeadDim>(v, lane_in_row);
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { v[k] = v[k] * p.hadamard_scale; }
  }

  if (pass != Pass::kWrite) {
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { amax = max_keeping_nan(amax, fabsf(v[k])); }
    amax = cta_max(amax, scratch);
  }
  if (pass == Pass::kChunkAmax) {
    if (threadIdx.x == 0) { p.partial_amax[blockIdx.x] = amax; }
    return;
  }

  BlockScale const s(amax);
  if (valid) {
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { v[k] = (v[k] * s.pre) * s.scale; }
#pragma unroll
    for (int r = 0; r < L::kRuns; ++r) {
      *reinterpret_cast<uint4*>(p.x8 + offset + r * L::kRunStride) = to_e4m3(v + r * L::kRun);
    }
  }
  if (threadIdx.x == 0 && part == 0) { p.descale[head_index * g.num_blocks + block] = s.descale; }
}

}  // namespace jax_fa3::quantize
