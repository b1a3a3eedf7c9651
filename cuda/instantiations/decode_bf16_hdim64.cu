#include "decode/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterDecodeVariant const registered{{"bfloat16", 64, &jax_fa3::run_decode<__nv_bfloat16, 64>,
                                                        jax_fa3::decode_shape<__nv_bfloat16, 64>()}};
