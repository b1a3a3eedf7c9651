#include "ffi/registry.h"

namespace jax_fa3 {

std::vector<FwdVariant>& fwd_variants() {
  static std::vector<FwdVariant> table;  // filled during static initialisation, read-only afterwards
  return table;
}

FwdVariant const* find_fwd_variant(std::string const& dtype, std::string const& out_dtype, int head_dim,
                                   int head_dim_v) {
  for (FwdVariant const& v : fwd_variants()) {
    if (v.dtype == dtype && v.out_dtype == out_dtype && v.head_dim == head_dim && v.head_dim_v == head_dim_v) {
      return &v;
    }
  }
  return nullptr;
}

std::vector<BwdVariant>& bwd_variants() {
  static std::vector<BwdVariant> table;
  return table;
}

BwdVariant const* find_bwd_variant(std::string const& dtype, int head_dim, int head_dim_v) {
  for (BwdVariant const& v : bwd_variants()) {
    if (v.dtype == dtype && v.head_dim == head_dim && v.head_dim_v == head_dim_v) { return &v; }
  }
  return nullptr;
}

std::vector<DecodeVariant>& decode_variants() {
  static std::vector<DecodeVariant> table;
  return table;
}

DecodeVariant const* find_decode_variant(std::string const& dtype, int head_dim) {
  for (DecodeVariant const& v : decode_variants()) {
    if (v.dtype == dtype && v.head_dim == head_dim) { return &v; }
  }
  return nullptr;
}

}  // namespace jax_fa3
