// Small helpers every FFI handler uses to check XLA's buffers and report what is wrong.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

namespace jax_fa3 {

inline std::string shape_str(xla::ffi::AnyBuffer const& b) {
  std::string s = "[";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) { s += (i ? ", " : "") + std::to_string(dims[i]); }
  return s + "]";
}

inline xla::ffi::Error invalid(std::string const& message) {
  return xla::ffi::Error::InvalidArgument("jax_fa3: " + message);
}

inline char const* dtype_name(xla::ffi::DataType t) {
  switch (t) {
    case xla::ffi::DataType::BF16: return "bfloat16";
    case xla::ffi::DataType::F16: return "float16";
    default: return nullptr;
  }
}

// The forward also reads FP8 (e4m3) q, k, v.
inline char const* fwd_input_dtype_name(xla::ffi::DataType t) {
  return t == xla::ffi::DataType::F8E4M3FN ? "float8_e4m3fn" : dtype_name(t);
}

inline bool aligned16(void const* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// An optional operand left out: shape [0].
inline bool absent(xla::ffi::AnyBuffer const& b) { return b.dimensions().size() == 1 && b.dimensions()[0] == 0; }

inline bool has_dims(xla::ffi::AnyBuffer const& b, std::initializer_list<int64_t> dims) {
  auto d = b.dimensions();
  if (d.size() != dims.size()) { return false; }
  size_t i = 0;
  for (int64_t x : dims) {
    if (d[i++] != x) { return false; }
  }
  return true;
}

// JAX_FA3_DEBUG_POISON=1 fills outputs with NaN before each launch so that tests see
// any element a kernel fails to write. Read once; asynchronous, so graph-safe.
inline bool poison_outputs() {
  static bool const enabled = [] {
    char const* v = std::getenv("JAX_FA3_DEBUG_POISON");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return enabled;
}

// Poisons the (non-empty) outputs if asked to, then calls launch(), which enqueues the
// kernels on the stream and returns their CUDA error; an error comes back as Internal.
template <class Launch>
xla::ffi::Error poison_and_launch(char const* what, cudaStream_t stream,
                                  std::initializer_list<xla::ffi::Result<xla::ffi::AnyBuffer>*> outputs,
                                  Launch&& launch) {
  if (poison_outputs()) {
    for (xla::ffi::Result<xla::ffi::AnyBuffer>* output : outputs) {
      if ((*output)->size_bytes() == 0) { continue; }
      // 0xFF bytes are NaN in bf16/f16/f32.
      if (cudaError_t e = cudaMemsetAsync((*output)->untyped_data(), 0xFF, (*output)->size_bytes(), stream);
          e != cudaSuccess) {
        return xla::ffi::Error::Internal(cudaGetErrorString(e));
      }
    }
  }
  if (cudaError_t e = launch(); e != cudaSuccess) {
    return xla::ffi::Error::Internal(std::string("jax_fa3 ") + what + " launch failed: " + cudaGetErrorString(e));
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_fa3
