// The table of compiled kernel variants. Each file in cuda/instantiations/ adds its
// (direction, dtype, head dims) entry at load time, so the table is exactly what was
// built; Python reads it through _fa3_cuda.variants().
#pragma once

#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/bwd_params.h"
#include "common/params.h"

namespace jax_fa3 {

struct FwdVariant {
  std::string dtype;  // numpy name: "bfloat16" or "float16"
  int head_dim;
  int head_dim_v;
  cudaError_t (*run)(FwdParams const&, cudaStream_t);
  TileShape segment_tile;  // the packed-sequence kernel's tile
};

struct BwdVariant {
  std::string dtype;
  int head_dim;
  int head_dim_v;
  cudaError_t (*run)(BwdParams const&, cudaStream_t);
  int64_t (*workspace_bytes)(BwdParams const&);
  TileShape segment_tile;
};

std::vector<FwdVariant>& fwd_variants();
FwdVariant const* find_fwd_variant(std::string const& dtype, int head_dim, int head_dim_v);

std::vector<BwdVariant>& bwd_variants();
BwdVariant const* find_bwd_variant(std::string const& dtype, int head_dim, int head_dim_v);

struct RegisterFwdVariant {
  explicit RegisterFwdVariant(FwdVariant variant) { fwd_variants().push_back(std::move(variant)); }
};

struct RegisterBwdVariant {
  explicit RegisterBwdVariant(BwdVariant variant) { bwd_variants().push_back(std::move(variant)); }
};

}  // namespace jax_fa3
