// The PTX the forward and backward kernels issue by hand: one wrapper per instruction
// (or fixed instruction pair) that CUTLASS and CuTe do not offer in the form we need.
#pragma once

#include <cstdint>

#include <cute/arch/util.hpp>

namespace jax_fa3 {

// Hardware named barrier `id` (0 belongs to __syncthreads) over num_threads threads.
__device__ __forceinline__ void named_barrier_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int num_threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Four 8x8 matrices of 16-bit elements, transposed, from the shared-memory rows the lanes address.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t shared_address, uint32_t (&words)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(words[0]), "=r"(words[1]), "=r"(words[2]), "=r"(words[3])
               : "r"(shared_address));
}

// Four 8x8 matrices of 16-bit elements to the shared-memory rows the lanes address.
__device__ __forceinline__ void stmatrix_x4(uint32_t shared_address, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("stmatrix.sync.aligned.x4.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(shared_address), "r"(a),
               "r"(b), "r"(c), "r"(d));
}

// A 1-D bulk copy global -> shared that completes bytes on the stage's barrier.
__device__ __forceinline__ void bulk_load(void* shared, void const* global, uint32_t bytes, uint64_t& barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          cute::cast_smem_ptr_to_uint(shared)),
      "l"(global), "r"(bytes), "r"(cute::cast_smem_ptr_to_uint(&barrier))
      : "memory");
}

// A 1-D bulk reduce-add shared -> global, committed as a bulk group of its own.
__device__ __forceinline__ void bulk_reduce_add_f32(float* global, float const* shared, int bytes) {
  uint32_t const shared_address = cute::cast_smem_ptr_to_uint(shared);
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               "cp.async.bulk.commit_group;" ::"l"(global), "r"(shared_address), "r"(bytes)
               : "memory");
}

// Waits until this thread's bulk groups have completed (their writes are done) ...
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// ... or only until they have read their shared-memory source.
__device__ __forceinline__ void bulk_wait_all_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// One 16-byte reduction (no return value) into global memory.
__device__ __forceinline__ void reduce_add_f32x4(float* global, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(global), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

__device__ __forceinline__ int load_acquire(int const* address) {
  int value;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

}  // namespace jax_fa3
