// Shared-memory atoms for WGMMA operands and register views of WGMMA accumulators.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_conversion.h>

namespace jax_fa3 {

using namespace cute;

// The widest swizzle atom that tiles an (mn, k) WGMMA operand with the given major mode.
template <GMMA::Major kMajor, class Element, int kMN, int kK>
constexpr auto gmma_smem_atom() {
  if constexpr (kMajor == GMMA::Major::K) {
    if constexpr (kK % size<1>(GMMA::Layout_K_SW128_Atom<Element>{}) == 0) {
      return GMMA::Layout_K_SW128_Atom<Element>{};
    } else if constexpr (kK % size<1>(GMMA::Layout_K_SW64_Atom<Element>{}) == 0) {
      return GMMA::Layout_K_SW64_Atom<Element>{};
    } else {
      static_assert(kK % size<1>(GMMA::Layout_K_SW32_Atom<Element>{}) == 0, "head dim must be a multiple of 16");
      return GMMA::Layout_K_SW32_Atom<Element>{};
    }
  } else {
    if constexpr (kMN % size<0>(GMMA::Layout_MN_SW128_Atom<Element>{}) == 0) {
      return GMMA::Layout_MN_SW128_Atom<Element>{};
    } else if constexpr (kMN % size<0>(GMMA::Layout_MN_SW64_Atom<Element>{}) == 0) {
      return GMMA::Layout_MN_SW64_Atom<Element>{};
    } else {
      static_assert(kMN % size<0>(GMMA::Layout_MN_SW32_Atom<Element>{}) == 0, "head dim must be a multiple of 16");
      return GMMA::Layout_MN_SW32_Atom<Element>{};
    }
  }
}

// A WGMMA accumulator ((2, 2, N/8), MMA_M, MMA_N) seen as (rows, columns). Within a 64-row
// atom a thread owns rows r and r+8 and, in every group of 8 columns, two adjacent columns;
// the four threads of a quad share the rows.
template <class AccLayout>
CUTE_HOST_DEVICE constexpr auto acc_rows_cols(AccLayout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0, 0>(acc))::value == 2 && decltype(size<0, 1>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The same registers, once converted to 16 bits, as the A operand of a register-sourced
// WGMMA: one k-block of 16 columns is two consecutive 8-column groups of the accumulator.
template <class AccLayout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(AccLayout acc) {
  auto split = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(split), get<1>(split), get<2, 0>(split)),
                     get<1>(acc),
                     coalesce(make_layout(get<2, 1>(split), get<2>(acc))));
}

// Element-wise numeric conversion of a register fragment into another of equal size.
template <class SrcEngine, class SrcLayout, class DstEngine, class DstLayout>
CUTE_DEVICE void convert_into(Tensor<SrcEngine, SrcLayout> const& src, Tensor<DstEngine, DstLayout>& dst) {
  using From = typename SrcEngine::value_type;
  using To = typename DstEngine::value_type;
  constexpr int kSize = decltype(size(src))::value;
  static_assert(decltype(size(dst))::value == kSize);
  cutlass::NumericArrayConverter<To, From, kSize> convert;
  *reinterpret_cast<cutlass::Array<To, kSize>*>(raw_pointer_cast(dst.data())) =
      convert(*reinterpret_cast<cutlass::Array<From, kSize> const*>(raw_pointer_cast(src.data())));
}

template <class To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
  Tensor dst = make_tensor<To>(src.layout());
  convert_into(src, dst);
  return dst;
}

// Two adjacent values of an accumulator row as one 32-bit word of 16-bit elements, for a
// single 4-byte store. (Built as two converted halves, ptxas stored them as two 16-bit
// stores plus one.)
template <class Element>
CUTE_DEVICE uint32_t pack_pair(float a, float b) {
  cutlass::Array<Element, 2> const pair = cutlass::NumericArrayConverter<Element, float, 2>{}(cutlass::Array<float, 2>{a, b});
  return reinterpret_cast<uint32_t const&>(pair);
}

}  // namespace jax_fa3
