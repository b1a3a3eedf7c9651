// The FP8 quantizer's FFI handler symbol (CONTRACT.md, jax_fa3_fp8_quantize), exported to
// Python by module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

extern "C" {
XLA_FFI_Error* JaxFa3Fp8Quantize(XLA_FFI_CallFrame* call_frame);  // ffi/quantize_ffi.cc
}
