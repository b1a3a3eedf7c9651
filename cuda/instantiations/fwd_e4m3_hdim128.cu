#include "ffi/registry.h"
#include "fwd/launch.h"

static jax_fa3::RegisterFwdVariant const registered{{"float8_e4m3fn", "bfloat16", 128, 128,
    &jax_fa3::run_fwd<cutlass::float_e4m3_t, cutlass::bfloat16_t, 128>, jax_fa3::TileShape{0, 0},
    jax_fa3::fwd_tile<cutlass::float_e4m3_t, 128>()}};
