#include "bwd/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterBwdVariant const registered{
    {"float16", 256, 256, &jax_fa3::run_bwd<cutlass::half_t, 256>, &jax_fa3::bwd_workspace_bytes<cutlass::half_t, 256>,
     jax_fa3::bwd_segment_tile<256>()}};
