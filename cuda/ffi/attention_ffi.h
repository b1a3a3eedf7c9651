// The FFI handler symbols (see CONTRACT.md), exported to Python by module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

extern "C" {
XLA_FFI_Error* JaxFa3Fwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxFa3Bwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxFa3Decode(XLA_FFI_CallFrame* call_frame);  // ffi/decode_ffi.cc
}
