#include "ffi/registry.h"
#include "fwd/launch.h"

static jax_fa3::RegisterFwdVariant const registered{{"bfloat16", "bfloat16", 192, 192,
    &jax_fa3::run_fwd<cutlass::bfloat16_t, cutlass::bfloat16_t, 192>, jax_fa3::fwd_segment_tile<192>(),
    jax_fa3::fwd_tile<cutlass::bfloat16_t, 192>()}};
