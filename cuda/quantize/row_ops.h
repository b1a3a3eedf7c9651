// Per-row device steps of the FP8 quantizer: where each lane's values sit in a row, the
// Walsh-Hadamard transform over them, NaN-keeping max and the e4m3 packing.
//
// Every float operation here is one IEEE operation in a fixed order (the translation unit
// is compiled without fast math and without FMA contraction), so the results equal the JAX
// reference (jax_fa3/fp8_quantize.py) bit for bit.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "quantize/params.h"

namespace jax_fa3::quantize {

constexpr uint32_t kFullWarp = 0xffffffffu;

// A row of kHeadDim elements is spread over kLanesPerRow lanes, kValues (32 or 64) each, in
// kRuns runs of 16 contiguous elements: value k of lane l is element
// (k / 16) * kRunStride + 16 l + k % 16, with kRunStride = kHeadDim / kRuns.
// A run is one 16-byte e4m3 store and one to four 16-byte loads. Butterflies of stride
// h < 16 and h >= kRunStride stay in a lane; the others (16 <= h < kRunStride) cross lanes.
template <int kHeadDim>
struct RowLayout {
  static constexpr int kValues = quantize_values_per_thread(kHeadDim);
  static constexpr int kRun = 16;
  static constexpr int kRuns = kValues / kRun;
  static constexpr int kRunStride = kHeadDim / kRuns;  // elements between a lane's runs
  static constexpr int kLanesPerRow = kHeadDim / kValues;
  static_assert(kRuns >= 2 && kLanesPerRow >= 1 && kLanesPerRow <= 32 && kHeadDim % kValues == 0);

  __device__ static int element(int value, int lane_in_row) {
    return (value / kRun) * kRunStride + lane_in_row * kRun + value % kRun;
  }
};

// max that returns NaN when either input is NaN (fmaxf would drop it).
__device__ __forceinline__ float max_keeping_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) { x = max_keeping_nan(x, __shfl_xor_sync(kFullWarp, x, m)); }
  return x;
}

// Butterflies (a, b) -> (a + b, a - b) between a lane's values k and k + h, for value strides
// h = kFirst, 2 kFirst, ... below kEnd, in that order.
template <int kFirst, int kEnd, int kValues>
__device__ __forceinline__ void in_lane_butterflies(float (&v)[kValues]) {
#pragma unroll
  for (int h = kFirst; h < kEnd; h *= 2) {
#pragma unroll
    for (int k = 0; k < kValues; ++k) {
      if (!(k & h)) {
        float const a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
    }
  }
}

// The unnormalised transform: butterflies (a, b) -> (a + b, a - b), a the element of lower
// index, for strides 1, 2, 4, ..., kHeadDim / 2 in that order.
template <int kHeadDim>
__device__ __forceinline__ void walsh_hadamard(float (&v)[RowLayout<kHeadDim>::kValues], int lane_in_row) {
  using L = RowLayout<kHeadDim>;
  in_lane_butterflies<1, L::kRun>(v);  // strides 1-8: inside a run
#pragma unroll
  for (int m = 1; m < L::kLanesPerRow; m *= 2) {  // stride 16 m: partner lane l ^ m
    // The lower lane keeps a + b, the upper b' = a - b: both are v * sign + other, one FFMA
    // that rounds once, as the add does (v * +-1 is exact).
    float const sign = lane_in_row & m ? -1.f : 1.f;
#pragma unroll
    for (int k = 0; k < L::kValues; ++k) { v[k] = fmaf(v[k], sign, __shfl_xor_sync(kFullWarp, v[k], m)); }
  }
  in_lane_butterflies<L::kRun, L::kValues>(v);  // strides kRunStride and up: between runs
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

// One run of 16 elements is sizeof(T) 16-byte words; `valid` false gives zeros.
template <class T>
struct Run {
  static constexpr int kWords = sizeof(T);
  uint4 words[kWords];

  __device__ __forceinline__ void load(T const* src, bool valid) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      words[w] = valid ? __ldg(reinterpret_cast<uint4 const*>(src) + w) : make_uint4(0, 0, 0, 0);
    }
  }

  // Multiplies the elements by the signs: XOR with their sign bits, packed as the elements are
  // (sign_words below), two bfloat16 or float16 values a 32-bit operation.
  __device__ __forceinline__ void flip_signs(uint4 const* masks) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint4 const m = masks[w];
      words[w].x ^= m.x, words[w].y ^= m.y, words[w].z ^= m.z, words[w].w ^= m.w;
    }
  }

  // The 16 elements as float32 (exact).
  __device__ __forceinline__ void to_floats(float* out) const {
    constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      T const* elements = reinterpret_cast<T const*>(&words[w]);
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) { out[w * kPerWord + e] = to_float(elements[e]); }
    }
  }
};

// Word i of a row of x as XOR masks: the sign bits of its elements where signs[] is negative.
template <class T>
__device__ __forceinline__ uint32_t sign_word(float const* signs, int i) {
  constexpr int kPerWord = 4 / int(sizeof(T));
  uint32_t mask = 0;
#pragma unroll
  for (int e = 0; e < kPerWord; ++e) {
    uint32_t const negative = __float_as_uint(__ldg(signs + i * kPerWord + e)) >> 31;
    mask |= negative << (8 * sizeof(T) * (e + 1) - 1);
  }
  return mask;
}

// Round-to-nearest-even e4m3 with saturation to +-448 (cvt.rn.satfinite), 16 values to 16 bytes.
__device__ __forceinline__ uint4 to_e4m3(float const* v) {
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t const lo = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * w], v[4 * w + 1]), __NV_SATFINITE, __NV_E4M3);
    uint32_t const hi = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * w + 2], v[4 * w + 3]), __NV_SATFINITE, __NV_E4M3);
    words[w] = lo | (hi << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

}  // namespace jax_fa3::quantize
