// The FP8 quantizer's problem: one float32 scale per (batch, head, block of rows), e4m3 out.
// Plain C++ (the FFI handler includes it); the kernels are in quantize.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "quantize/geometry.h"

namespace jax_fa3 {

enum class QuantizeInput { kBfloat16, kFloat16, kFloat32 };

struct QuantizeParams {
  void const* x;          // [batch, seqlen, heads, head_dim], `input` elements
  float const* signs;     // [head_dim] or nullptr (no Hadamard transform)
  uint8_t* x8;            // [batch, seqlen, heads, head_dim] e4m3
  float* descale;         // [batch, heads, num_blocks]
  float* partial_amax;    // [batch * heads * chunks_per_head] (two-pass only)
  QuantizeInput input;
  int64_t batch, seqlen, heads;
  int head_dim;           // 64, 128 or 256
  float hadamard_scale;   // float32(1 / sqrt(head_dim)), applied after the transform
  QuantizeGeometry geometry;
};

bool quantize_head_dim_compiled(int64_t head_dim);
cudaError_t run_fp8_quantize(QuantizeParams const& params, cudaStream_t stream);

}  // namespace jax_fa3
