// The FP8 quantizer's launches, for bf16/f16/f32 inputs and head dims 64, 128, 256: the one
// translation unit of cuda/quantize (compiled without fast math and FMA contraction, see
// CMakeLists.txt, so that its float arithmetic is the reference's).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "quantize/kernel.h"
#include "quantize/params.h"

namespace jax_fa3 {
namespace {

template <class T, int kHeadDim>
cudaError_t launch(QuantizeParams const& p, cudaStream_t stream) {
  QuantizeGeometry const& g = p.geometry;
  int64_t const ctas = p.batch * p.heads * g.chunks_per_head();
  if (ctas == 0) { return cudaSuccess; }
  dim3 const grid{unsigned(ctas)};  // the handler refuses more than 2^31 - 1 (quantize_ctas)
  dim3 const block{unsigned(quantize::kThreads<kHeadDim>)};
  auto const kernel = quantize::fp8_quantize_kernel<T, kHeadDim>;
  if (g.two_pass()) {
    kernel<<<grid, block, 0, stream>>>(p, quantize::Pass::kChunkAmax);
    kernel<<<grid, block, 0, stream>>>(p, quantize::Pass::kWrite);
  } else {
    kernel<<<grid, block, 0, stream>>>(p, quantize::Pass::kWhole);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_for_head_dim(QuantizeParams const& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool quantize_head_dim_compiled(int64_t head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }

cudaError_t run_fp8_quantize(QuantizeParams const& p, cudaStream_t stream) {
  switch (p.input) {
    case QuantizeInput::kBfloat16: return launch_for_head_dim<__nv_bfloat16>(p, stream);
    case QuantizeInput::kFloat16: return launch_for_head_dim<__half>(p, stream);
    case QuantizeInput::kFloat32: return launch_for_head_dim<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_fa3
