#include "decode/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterDecodeVariant const registered{{"float16", 64, &jax_fa3::run_decode<__half, 64>,
                                                        jax_fa3::decode_shape<__half, 64>()}};
