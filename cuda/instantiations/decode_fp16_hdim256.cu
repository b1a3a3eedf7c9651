#include "decode/launch.h"
#include "ffi/registry.h"

static jax_fa3::RegisterDecodeVariant const registered{{"float16", 256, &jax_fa3::run_decode<__half, 256>,
                                                        jax_fa3::decode_shape<__half, 256>()}};
