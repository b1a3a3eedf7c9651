// The table of compiled kernel variants. Each file in cuda/instantiations/ adds its
// (direction, dtype, head dims) entry at load time, so the table is exactly what was
// built; Python reads it through _fa3_cuda.variants().
#pragma once

#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/bwd_params.h"
#include "common/params.h"
#include "decode/params.h"

namespace jax_fa3 {

// Input and output element types are separate axes: the FP8 forward reads float8_e4m3fn
// and writes bfloat16.
struct FwdVariant {
  std::string dtype;      // numpy name of q, k, v: "bfloat16", "float16" or "float8_e4m3fn"
  std::string out_dtype;  // numpy name of the output
  int head_dim;
  int head_dim_v;
  cudaError_t (*run)(FwdParams const&, cudaStream_t);
  TileShape segment_tile;  // the packed-sequence kernel's tile ({0, 0}: none)
  TileShape tile;          // the kernel's tile without a mask
};

struct BwdVariant {
  std::string dtype;
  int head_dim;
  int head_dim_v;
  cudaError_t (*run)(BwdParams const&, cudaStream_t);
  int64_t (*workspace_bytes)(BwdParams const&);
  TileShape segment_tile;
};

// KV-cache decode (q/k/v head dims equal): the split kernel and its combine.
struct DecodeVariant {
  std::string dtype;
  int head_dim;
  cudaError_t (*run)(DecodeParams const&, cudaStream_t);
  DecodeShape shape;
};

std::vector<FwdVariant>& fwd_variants();
FwdVariant const* find_fwd_variant(std::string const& dtype, std::string const& out_dtype, int head_dim,
                                   int head_dim_v);

std::vector<BwdVariant>& bwd_variants();
BwdVariant const* find_bwd_variant(std::string const& dtype, int head_dim, int head_dim_v);

std::vector<DecodeVariant>& decode_variants();
DecodeVariant const* find_decode_variant(std::string const& dtype, int head_dim);

struct RegisterFwdVariant {
  explicit RegisterFwdVariant(FwdVariant variant) { fwd_variants().push_back(std::move(variant)); }
};

struct RegisterBwdVariant {
  explicit RegisterBwdVariant(BwdVariant variant) { bwd_variants().push_back(std::move(variant)); }
};

struct RegisterDecodeVariant {
  explicit RegisterDecodeVariant(DecodeVariant variant) { decode_variants().push_back(std::move(variant)); }
};

}  // namespace jax_fa3
