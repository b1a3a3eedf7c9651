#include "ffi/registry.h"
#include "fwd/launch.h"

static jax_fa3::RegisterFwdVariant const registered{{"float16", "float16", 256, 256,
    &jax_fa3::run_fwd<cutlass::half_t, cutlass::half_t, 256>, jax_fa3::fwd_segment_tile<256>(),
    jax_fa3::fwd_tile<cutlass::half_t, 256>()}};
