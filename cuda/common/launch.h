// Host-side launch helpers shared by the kernels' launchers.
#pragma once

#include <mutex>

#include <cuda_runtime.h>

namespace jax_fa3 {

// CUDA's limit on a grid's y and z dimensions; kernels with a batch or head axis there
// loop over what does not fit.
constexpr int kMaxGridZ = 65535;
constexpr int kMaxGridY = 65535;

// Opting in to more than 48 KB of shared memory is a per-function, per-device setting,
// made once per kernel and device (the kernel is a template argument so each gets its own).
template <auto kKernel>
cudaError_t set_shared_memory(int bytes) {
  static std::once_flag configured[64];
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) { return e; }
  cudaError_t result = cudaSuccess;
  std::call_once(configured[device % 64], [&] {
    result = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
  return result;
}

}  // namespace jax_fa3
