#include "ffi/registry.h"
#include "fwd/launch.h"

static jax_fa3::RegisterFwdVariant const registered{{"float16", "float16", 96, 96,
    &jax_fa3::run_fwd<cutlass::half_t, cutlass::half_t, 96>, jax_fa3::fwd_segment_tile<96>(),
    jax_fa3::fwd_tile<cutlass::half_t, 96>()}};
