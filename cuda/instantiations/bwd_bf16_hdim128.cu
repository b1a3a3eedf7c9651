#include "bwd/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterBwdVariant const registered{
    {"bfloat16", 128, 128, &jax_fa3::run_bwd<cutlass::bfloat16_t, 128>, &jax_fa3::bwd_workspace_bytes<cutlass::bfloat16_t, 128>,
     jax_fa3::bwd_segment_tile<128>()}};
