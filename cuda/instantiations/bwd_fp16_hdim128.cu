#include "bwd/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterBwdVariant const registered{
    {"float16", 128, 128, &jax_fa3::run_bwd<cutlass::half_t, 128>, &jax_fa3::bwd_workspace_bytes<cutlass::half_t, 128>,
     jax_fa3::bwd_segment_tile<128>()}};
