// The packed-sequence descriptor handlers (CONTRACT.md, jax_fa3_segment_rows,
// jax_fa3_forward_tiles, jax_fa3_backward_plans), exported to Python by module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

extern "C" {
XLA_FFI_Error* JaxFa3SegmentRows(XLA_FFI_CallFrame* call_frame);     // ffi/plans_ffi.cc
XLA_FFI_Error* JaxFa3ForwardTiles(XLA_FFI_CallFrame* call_frame);    // ffi/plans_ffi.cc
XLA_FFI_Error* JaxFa3BackwardPlans(XLA_FFI_CallFrame* call_frame);   // ffi/plans_ffi.cc
}
