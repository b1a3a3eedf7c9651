#include "bwd/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterBwdVariant const registered{
    {"float16", 96, 96, &jax_fa3::run_bwd<cutlass::half_t, 96>, &jax_fa3::bwd_workspace_bytes<cutlass::half_t, 96>}};
