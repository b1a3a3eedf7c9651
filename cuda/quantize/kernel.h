// The FP8 quantizer kernel: x (bf16/f16/f32) -> x' = WHT(x * signs) / sqrt(d) (or x' = x)
// -> one scale per block of rows -> e4m3. A CTA takes a chunk of rows (geometry.h) in slabs of
// 64 rows, 32 or 64 values a thread in registers (geometry.h).
#pragma once

#include <cstdint>

#include "quantize/params.h"
#include "quantize/row_ops.h"

namespace jax_fa3::quantize {

// kWhole: the block is one chunk: amax and write in one launch. A chunk of one slab stays in
// registers between the two; a longer one is read again for the write (from L2).
// kChunkAmax, kWrite: a longer block: each chunk's amax to the workspace, then a second launch
// reduces the block's chunk amaxes and writes (re-reading its chunk of x).
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

template <int kHeadDim>
constexpr int kThreads = quantize_threads(kHeadDim);

// With 32 values a thread, 64 registers, so that an SM holds 1024 threads (4 CTAs at d128):
// loading the next slab while this one is transformed (80 registers, 768 threads an SM)
// measured 3-8% slower (NOTES, session 21).
template <class T, int kHeadDim>
__global__ void __launch_bounds__(kThreads<kHeadDim>, quantize_threads_per_sm(kHeadDim) / kThreads<kHeadDim>)
    fp8_quantize_kernel(QuantizeParams const p, Pass const pass) {
  using L = RowLayout<kHeadDim>;
  constexpr int kRowWords = kHeadDim * int(sizeof(T)) / 16;  // 16-byte words of a row of x
  __shared__ uint4 sign_masks[kRowWords];
  __shared__ float scratch[kThreads<kHeadDim> / 32];
  int const lane_in_row = threadIdx.x % L::kLanesPerRow;
  int const row_in_slab = threadIdx.x / L::kLanesPerRow;
  bool const rotate = p.signs != nullptr;

  // One CTA per chunk: blockIdx.x = (b * heads + h) * chunks_per_head + chunk.
  QuantizeGeometry const& g = p.geometry;
  int64_t const chunks_per_head = g.num_blocks * g.chunks_per_block;
  int64_t const head_index = blockIdx.x / chunks_per_head;  // b * heads + h
  int64_t const chunk = blockIdx.x % chunks_per_head;
  int64_t const block = chunk / g.chunks_per_block, part = chunk % g.chunks_per_block;
  int64_t const block_begin = block * g.block_rows;
  int64_t const chunk_begin = block_begin + part * g.chunk_rows;
  int64_t const chunk_end = min(min(chunk_begin + g.chunk_rows, block_begin + g.block_rows), p.seqlen);
  int const slabs = chunk_end > chunk_begin ? int((chunk_end - chunk_begin + kQuantizeSlabRows - 1) / kQuantizeSlabRows) : 0;
  int64_t const b = head_index / p.heads, h = head_index % p.heads;
  int64_t const row_stride = p.heads * kHeadDim;  // elements between two rows of one head
  int64_t const first = ((b * p.seqlen + chunk_begin + row_in_slab) * p.heads + h) * kHeadDim + lane_in_row * L::kRun;
  auto offset = [&](int slab) { return first + int64_t(slab) * kQuantizeSlabRows * row_stride; };
  auto valid = [&](int slab) { return chunk_begin + slab * kQuantizeSlabRows + row_in_slab < chunk_end; };

  if (rotate) {
    uint32_t* const words = reinterpret_cast<uint32_t*>(sign_masks);
    for (int i = threadIdx.x; i < 4 * kRowWords; i += blockDim.x) { words[i] = sign_word<T>(p.signs, i); }
    __syncthreads();
  }

  // This thread's values of slab `slab` as float32 in v, rotated but not yet scaled by
  // 1 / sqrt(head_dim) (rows past the chunk give zeros).
  float v[L::kValues];
  auto load_and_rotate = [&](int slab) {
    Run<T> runs[L::kRuns];
#pragma unroll
    for (int r = 0; r < L::kRuns; ++r) {
      runs[r].load(static_cast<T const*>(p.x) + offset(slab) + r * L::kRunStride, valid(slab));
    }
#pragma unroll
    for (int r = 0; r < L::kRuns; ++r) {
      if (rotate) { runs[r].flip_signs(sign_masks + L::element(r * L::kRun, lane_in_row) * int(sizeof(T)) / 16); }
      runs[r].to_floats(v + r * L::kRun);
    }
    if (rotate) { walsh_hadamard<kHeadDim>(v, lane_in_row); }
  };

  float amax = 0.f;
  if (pass == Pass::kWrite) {  // the block's chunk amaxes
    float const* chunk_amax = p.partial_amax + head_index * chunks_per_head + block * g.chunks_per_block;
    for (int i = threadIdx.x; i < g.chunks_per_block; i += blockDim.x) { amax = max_keeping_nan(amax, chunk_amax[i]); }
    amax = cta_max(amax, scratch);
  } else {
    for (int slab = 0; slab < slabs; ++slab) {
      load_and_rotate(slab);
#pragma unroll
      for (int k = 0; k < L::kValues; ++k) { amax = max_keeping_nan(amax, fabsf(v[k])); }
    }
    // max |y * s| = float32(max |y| * s) for s > 0: rounding is monotonic (NaN stays NaN).
    if (rotate) { amax = amax * p.hadamard_scale; }
    amax = cta_max(amax, scratch);
    if (pass == Pass::kChunkAmax) {
      if (threadIdx.x == 0) { p.partial_amax[blockIdx.x] = amax; }
      return;
    }
  }

  // The write: a slab read again (from L2), or, for a chunk of one slab, v as it is.
  BlockScale const s(amax);
  bool const resident = pass == Pass::kWhole && slabs == 1;
  for (int slab = 0; slab < slabs; ++slab) {
    if (!resident) { load_and_rotate(slab); }
    if (!valid(slab)) { continue; }
    if (rotate) {
#pragma unroll
      for (int k = 0; k < L::kValues; ++k) { v[k] = v[k] * p.hadamard_scale; }
    }
    if (s.pre != 1.f) {  // a block below 2^-64 (x * 1 would change nothing)
#pragma unroll
      for (int k = 0; k < L::kValues; ++k) { v[k] = v[k] * s.pre; }
    }
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { v[k] = v[k] * s.scale; }
#pragma unroll
    for (int r = 0; r < L::kRuns; ++r) {
      *reinterpret_cast<uint4*>(p.x8 + offset(slab) + r * L::kRunStride) = to_e4m3(v + r * L::kRun);
    }
  }
  if (threadIdx.x == 0 && part == 0) { p.descale[head_index * g.num_blocks + block] = s.descale; }
}

}  // namespace jax_fa3::quantize
